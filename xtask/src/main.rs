//! `cargo xtask <task>`: the project's scripted tasks (std only).
//!
//! * `ci`: formatting, clippy, docs and the whole test suite, in that order,
//!   stopping at the first failure.
//! * `proptest [--cases N]`: the property tests (test functions named
//!   `prop_*`) in release mode with `PROPTEST_CASES=N`.

mod bench;
mod crash;
mod fuzz;
mod soak;

use std::env;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  ci                    cargo fmt --check, clippy -D warnings, doc (warnings denied),
                        then cargo test --workspace; stops at the first failure
  proptest [--cases N]  run the property tests (fns named prop_*) in release mode
                        with PROPTEST_CASES=N (default 2000)
  bench [--quick] [--no-criterion] [--reps N] [--only 1,2,3,5]
                        criterion benches of every crate, then ours vs QEMU's tools
                        side by side; writes BENCHMARKS.md
  fuzz [--minutes N] [--target NAME]...
                        run each cargo-fuzz target of fuzz/ for N minutes (default 10)
  crash [--runs N] [--seed S]
                        kill -9 either daemon at N random points (default 200) while a
                        writer writes and flushes; check images and acknowledged data
  soak [--minutes N] [--seed S]
                        loop `blockrep demo` with random seeds and options (default 30 min)
  help                  show this message
";

const DEFAULT_PROPTEST_CASES: u64 = 2000;

/// One command of a task, with the extra environment it needs.
struct Step {
    args: Vec<&'static str>,
    env: Vec<(&'static str, String)>,
}

impl Step {
    fn new(args: &[&'static str]) -> Self {
        Step {
            args: args.to_vec(),
            env: Vec::new(),
        }
    }

    fn env(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.env.push((key, value.into()));
        self
    }

    fn describe(&self) -> String {
        let mut s: String = self.env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        s.push_str("cargo ");
        s.push_str(&self.args.join(" "));
        s
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(task) = args.first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let result = match task.as_str() {
        "ci" => no_options("ci", rest).and_then(|()| run_steps("ci", &ci_steps())),
        "proptest" => proptest_cases(rest).and_then(|cases| {
            run_steps(
                "proptest",
                &[
                    Step::new(&["test", "--workspace", "--release", "--", "prop_"])
                        .env("PROPTEST_CASES", cases.to_string()),
                ],
            )
        }),
        "bench" => bench::run(&workspace_root(), rest),
        "fuzz" => fuzz::run(&workspace_root(), rest),
        "crash" => crash::run(&workspace_root(), rest),
        "soak" => soak::run(&workspace_root(), rest),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown task '{other}'\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("xtask: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn ci_steps() -> Vec<Step> {
    vec![
        Step::new(&["fmt", "--all", "--", "--check"]),
        Step::new(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        Step::new(&["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-Dwarnings"),
        Step::new(&["test", "--workspace"]),
    ]
}

fn no_options(task: &str, rest: &[String]) -> Result<(), String> {
    match rest.first() {
        None => Ok(()),
        Some(extra) => Err(format!(
            "'{task}' takes no options, got '{extra}'\n\n{USAGE}"
        )),
    }
}

fn proptest_cases(rest: &[String]) -> Result<u64, String> {
    match rest {
        [] => Ok(DEFAULT_PROPTEST_CASES),
        [flag, n] if flag == "--cases" => match n.parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("--cases needs a positive number, got '{n}'")),
        },
        _ => Err(format!(
            "proptest: unexpected options {rest:?} (expected [--cases N])\n\n{USAGE}"
        )),
    }
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(PathBuf::from).unwrap_or(dir)
}

fn run_steps(task: &str, steps: &[Step]) -> Result<(), String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let root = workspace_root();
    for (i, step) in steps.iter().enumerate() {
        let what = step.describe();
        eprintln!("xtask {task}: [{}/{}] {what}", i + 1, steps.len());
        let status = Command::new(&cargo)
            .args(&step.args)
            .envs(step.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&root)
            .status()
            .map_err(|e| format!("{task}: could not run `{what}`: {e}"))?;
        if !status.success() {
            let code = status.code().map_or_else(
                || "killed by a signal".to_string(),
                |c| format!("exit code {c}"),
            );
            return Err(format!(
                "{task} failed at step {}/{}: `{what}` ({code})",
                i + 1,
                steps.len()
            ));
        }
    }
    eprintln!("xtask {task}: all {} steps passed", steps.len());
    Ok(())
}
