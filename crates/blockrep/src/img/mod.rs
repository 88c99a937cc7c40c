//! `blockrep img`: image tools with `qemu-img`'s verbs, over our own stack
//! (`qcow-lite` for qcow2, positional file I/O for raw).
//!
//! Each verb takes the flags a `qemu-img` user types and prints what
//! `qemu-img` prints (`--output=json` with QEMU's field names), with the same
//! exit codes where they mean something. Every error a user can cause ends in
//! one line on stderr and a non-zero exit.

mod bench;
mod chain;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod error;
mod header;
mod info;
mod map;
mod rebase;
mod size;

use clap::{Args, Subcommand, ValueEnum};
use std::process::ExitCode;

pub use error::ImgError;

/// `--output=` choices of the verbs that have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Text for people, as qemu-img prints it.
    #[default]
    Human,
    /// JSON with QEMU's field names.
    Json,
}

/// Image formats the tools handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// qcow2 version 3 (through qcow-lite).
    Qcow2,
    /// A plain file.
    Raw,
}

impl Format {
    /// The name QEMU uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// Parse a format name as given on the command line or in a header.
    pub fn parse(s: &str) -> Result<Format, ImgError> {
        match s {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(ImgError::usage(format!(
                "Unknown file format '{other}' (supported: qcow2, raw)"
            ))),
        }
    }
}

/// A format name from the command line, checked when the verb runs (so a
/// wrong name is our one-line error, not a usage message).
#[derive(Debug, Clone)]
pub struct FormatName(pub String);

impl std::str::FromStr for FormatName {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(FormatName(s.to_string()))
    }
}

impl FormatName {
    /// The format it names.
    pub fn get(&self) -> Result<Format, ImgError> {
        Format::parse(&self.0)
    }
}

/// Check an optional format name.
pub(crate) fn opt_fmt(f: &Option<FormatName>) -> Result<Option<Format>, ImgError> {
    f.as_ref().map(FormatName::get).transpose()
}

/// The verbs of `blockrep img`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an image (qcow2 or raw), optionally over a backing file.
    Create(create::CreateArgs),
    /// Show an image's format, sizes, backing file and format-specific data.
    Info(info::InfoArgs),
    /// Check a qcow2 image's metadata; repair leaks or all errors with -r.
    Check(check::CheckArgs),
    /// Show where each range of the disk lives (layer, data, zero, host offset).
    Map(map::MapArgs),
    /// Compare the contents of two images.
    Compare(compare::CompareArgs),
    /// Commit an image's contents into its backing file (or a base further down).
    Commit(commit::CommitArgs),
    /// Copy an image, with its backing chain flattened, into a new image.
    Convert(convert::ConvertArgs),
    /// Change an image's backing file, keeping its contents (or not, with -u).
    Rebase(rebase::RebaseArgs),
    /// Run a simple I/O benchmark on an image.
    Bench(bench::BenchArgs),
}

/// Flags shared by verbs that open one image.
#[derive(Debug, Args, Clone)]
pub struct ImageOpt {
    /// Format of the image (probed when not given).
    #[arg(short = 'f')]
    pub format: Option<FormatName>,
}

/// Run one verb; the exit code follows qemu-img's where it means something.
pub fn run(cmd: Command) -> ExitCode {
    let res = match cmd {
        Command::Create(a) => create::run(a),
        Command::Info(a) => info::run(a),
        Command::Check(a) => check::run(a),
        Command::Map(a) => map::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Commit(a) => commit::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Rebase(a) => rebase::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match res {
        Ok(code) => ExitCode::from(code),
        Err((e, code)) => {
            let msg = e.to_string().replace('\n', " ");
            eprintln!("blockrep img: {msg}");
            ExitCode::from(code)
        }
    }
}

/// What a verb returns: its exit code, or an error with the exit code to use.
pub(crate) type VerbResult = Result<u8, (ImgError, u8)>;

/// Turn any error into a [`VerbResult`] failure with exit code 1.
pub(crate) fn fail1<T>(r: Result<T, ImgError>) -> Result<T, (ImgError, u8)> {
    r.map_err(|e| (e, 1))
}

/// Print JSON the way qemu-img does (four-space indentation).
pub(crate) fn print_json(v: &serde_json::Value) {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    if v.serialize(&mut ser).is_ok() {
        println!("{}", String::from_utf8_lossy(&out));
    }
}
