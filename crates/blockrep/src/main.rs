//! `blockrep`: the program users run.
//!
//! * `blockrep serve`: the daemon, one block graph driven over QMP, disks
//!   exported over NBD (module `serve`).
//! * `blockrep img`: image tools with `qemu-img`'s verbs (module `img`).
//!
//! Each subcommand lives in its own module with its own clap arguments; this
//! file only dispatches.

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
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Img(cmd) => img::run(cmd),
    }
}
