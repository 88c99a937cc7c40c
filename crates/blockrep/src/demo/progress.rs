//! Progress on stderr: a redrawn bar when stderr is a terminal, one plain
//! line every few seconds otherwise (logs, CI, tests).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// The demo's progress display.
pub(crate) struct Progress {
    tty: bool,
    start: Instant,
    last: Option<Instant>,
    bar_drawn: bool,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            last: None,
            bar_drawn: false,
        }
    }

    fn clear_bar(&mut self) {
        if self.bar_drawn {
            eprint!("\r\x1b[2K");
            self.bar_drawn = false;
        }
    }

    /// A new phase (one line).
    pub(crate) fn phase(&mut self, text: &str) {
        self.clear_bar();
        eprintln!("[{:6.2}s] {text}", self.start.elapsed().as_secs_f64());
    }

    /// The workload bar: elapsed of total, and a status text.
    pub(crate) fn bar(&mut self, elapsed: Duration, total: Duration, status: &str) {
        let now = Instant::now();
        let every = if self.tty {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(5)
        };
        if self.last.is_some_and(|l| now - l < every) {
            return;
        }
        self.last = Some(now);
        let frac = (elapsed.as_secs_f64() / total.as_secs_f64().max(1e-9)).clamp(0.0, 1.0);
        if self.tty {
            const W: usize = 30;
            let full = (frac * W as f64).round() as usize;
            eprint!(
                "\r\x1b[2K  [{}{}] {:5.1}/{:.1}s  {status}",
                "#".repeat(full),
                "-".repeat(W - full),
                elapsed.as_secs_f64(),
                total.as_secs_f64()
            );
            let _ = std::io::stderr().flush();
            self.bar_drawn = true;
        } else {
            eprintln!(
                "[{:6.2}s]   {:3.0}%  {status}",
                self.start.elapsed().as_secs_f64(),
                frac * 100.0
            );
        }
    }

    /// Ends the bar (before other output).
    pub(crate) fn done(&mut self) {
        self.clear_bar();
    }
}

/// `12.3 MiB` style sizes.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_sizes() {
        assert_eq!(super::human(0), "0 B");
        assert_eq!(super::human(1023), "1023 B");
        assert_eq!(super::human(1536), "1.5 KiB");
        assert_eq!(super::human(64 << 20), "64.0 MiB");
    }
}
