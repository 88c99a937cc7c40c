//! `perf-guard-probe ITERS [PATH...]`: sets up each hot-path workload (all of
//! them without PATH) and runs it `ITERS` times between the marker functions
//! callgrind dumps at (see the `perf_guard` crate docs).

use std::process::ExitCode;

use perf_guard::HotPath;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(Ok(iters)) = args.first().map(|n| n.parse::<u64>()) else {
        eprintln!("usage: perf-guard-probe ITERS [PATH...]");
        return ExitCode::from(2);
    };
    let paths: Result<Vec<HotPath>, String> = args[1..].iter().map(|p| p.parse()).collect();
    let paths = match paths {
        Ok(p) if p.is_empty() => HotPath::ALL.to_vec(),
        Ok(p) => p,
        Err(e) => {
            eprintln!("perf-guard-probe: {e}");
            return ExitCode::from(2);
        }
    };
    match perf_guard::probe_main(&paths, iters) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("perf-guard-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
