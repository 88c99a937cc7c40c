//! Command-line usage errors: one line on stderr, exit status 2, no panic.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(args)
        .output()
        .expect("run blockrep");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_are_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["img", "create"], "<FILENAME>"),
        (&["img", "frobnicate"], "frobnicate"),
        (
            &["img", "check", "--no-such-flag", "x.qcow2"],
            "--no-such-flag",
        ),
        (&["serve"], "--qmp"),
        (&["no-such-command"], "no-such-command"),
    ];
    for (args, needle) in cases {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, Some(2), "{args:?}: stderr {stderr:?}");
        assert_eq!(stdout, "", "{args:?}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr:?}");
        assert!(lines[0].starts_with("blockrep: "), "{args:?}: {stderr:?}");
        assert!(lines[0].contains(needle), "{args:?}: {stderr:?}");
        assert!(!stderr.contains("panicked"), "{args:?}");
    }
}

#[test]
fn help_and_version_still_print_normally() {
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("blockrep "), "{stdout:?}");
    let (code, stdout, _) = run(&["img", "--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("create"), "{stdout:?}");
}
