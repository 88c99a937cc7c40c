//! `blockrep`: the program users run.
//!
//! * `blockrep serve`: the daemon, one block graph driven over QMP, disks
//!   exported over NBD (module `serve`).
//! * `blockrep img`: image tools with `qemu-img`'s verbs (module `img`).
//!
//! Each subcommand lives in its own module with its own clap arguments; this
//! file only dispatches.

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod demo;
mod img;
mod serve;

/// COLO-style block replication: daemon, demo and image tools.
#[derive(Parser)]
#[command(name = "blockrep", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole system on embedded defaults: two daemons, guests,
    /// checkpoints, a failover, and a byte-for-byte verification.
    Demo(demo::Args),
    /// Run the daemon: one block graph, driven over QMP, exported over NBD.
    Serve(serve::Args),
    /// Image tools with qemu-img's verbs (create, info, check, map, ...).
    #[command(subcommand)]
    Img(img::Command),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Img(cmd) => img::run(cmd),
    }
}

/// Help and version go out as clap renders them; a usage error becomes one
/// line on stderr (what is wrong, and where to look) and exit status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            eprintln!("blockrep: {}", one_line(&e.render().to_string()));
            ExitCode::from(2)
        }
    }
}

/// Joins the message part of a clap error (everything before its `Usage:`
/// block) into one line, and points at `--help`.
fn one_line(rendered: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.strip_prefix("error: ").unwrap_or(line));
        }
    }
    let mut msg = parts.join(" ");
    if msg.is_empty() {
        msg.push_str("invalid arguments");
    }
    msg.push_str(" (see --help)");
    msg
}
