//! Pausing the kernel's free page reporting for the length of a run.
//!
//! A virtual machine with free page reporting (virtio-balloon) hands freed
//! memory back to its host in batches. The next process that needs that
//! much memory (page cache for the data it writes) takes a host page fault
//! on every page, which shows up inside its copies to the page cache. Which
//! side of an alternating pair that hits depends on where the batch falls,
//! not on the tool: on this project's 2-core VM (`page_reporting_order` 9),
//! figure 3 swung from ours 2.1-2.3 s / peer 0.8 s to ours 0.7 s / peer
//! 2.2 s between two runs minutes apart, and perf put 27% of the samples of
//! the slow side in `copy_folio_from_iter_atomic` against 1.4% for the
//! other. With reporting paused, three runs in a row gave ours 0.67-0.74 s
//! and the peer 0.72-0.90 s.
//!
//! The pause raises `page_reporting_order` past the largest page order (no
//! free block is ever that large) and puts the old value back when the run
//! ends. The old value is also kept in a file, so a run that was killed
//! before it could restore is repaired by the next one.

use std::path::{Path, PathBuf};

const PARAM: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// Reporting paused; dropping this puts the old order back.
pub struct Paused {
    saved: PathBuf,
    was: String,
}

/// What happened to free page reporting, for the report's machine section.
pub struct Outcome {
    pub paused: Option<Paused>,
    pub line: String,
}

/// One past the largest page order: the number of order columns in
/// `/proc/buddyinfo` (11 on x86-64).
fn orders() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/buddyinfo").ok()?;
    let line = s.lines().next()?;
    // "Node 0, zone      DMA      1      0 ..."
    let n = line.split_whitespace().skip(4).count();
    (n > 0).then_some(n)
}

/// Pause free page reporting when the machine has it. `saved` keeps the
/// value to restore across a killed run.
pub fn pause(saved: &Path) -> Outcome {
    let not = |why: String| Outcome {
        paused: None,
        line: why,
    };
    let Ok(current) = std::fs::read_to_string(PARAM) else {
        return not("free page reporting: not on this machine".into());
    };
    let current = current.trim().to_string();
    let Some(off) = orders() else {
        return not(format!(
            "free page reporting: on (order {current}); left on: /proc/buddyinfo unreadable"
        ));
    };
    // A value left by a run that was killed before it restored.
    let was = match std::fs::read_to_string(saved) {
        Ok(v) if current == off.to_string() => v.trim().to_string(),
        _ => current.clone(),
    };
    if let Err(e) = std::fs::write(saved, &was) {
        return not(format!(
            "free page reporting: on (order {was}); left on: cannot keep the old value in {}: {e}",
            saved.display()
        ));
    }
    if let Err(e) = std::fs::write(PARAM, off.to_string()) {
        let _ = std::fs::remove_file(saved);
        return not(format!(
            "free page reporting: on (order {was}); could not pause it ({e}: needs root). \
             Figures that free and reallocate much memory (3 above all) may swing between runs"
        ));
    }
    eprintln!(
        "xtask bench: free page reporting paused (page_reporting_order {was} -> {off}); \
         restored at the end (if this run is killed: echo {was} > {PARAM})"
    );
    Outcome {
        paused: Some(Paused {
            saved: saved.to_path_buf(),
            was: was.clone(),
        }),
        line: format!(
            "free page reporting (virtio-balloon): paused for the run (page_reporting_order \
             {was} -> {off}, restored after): a reporting pass makes whichever process next \
             takes that memory pay host page faults; see xtask/src/bench/page_reporting.rs"
        ),
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        match std::fs::write(PARAM, &self.was) {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.saved);
            }
            Err(e) => eprintln!(
                "xtask bench: could not restore page_reporting_order to {} ({e}); \
                 run: echo {} > {PARAM}",
                self.was, self.was
            ),
        }
    }
}
