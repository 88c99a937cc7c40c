//! `Qcow2::write_back`: metadata handed to the storage without a sync, so a
//! killed process (the storage keeps every write, as the page cache does)
//! loses nothing, while a power loss still leaves a valid structure.

use qcow_lite::{CrashStorage, CreateOptions, MemStorage, Qcow2, Rng};
use std::sync::Arc;

const CS: u64 = 4096;

/// The storage, the image on it, and the (offset, pattern) of each write.
type Written = (Arc<CrashStorage>, Qcow2<Arc<CrashStorage>>, Vec<(u64, u8)>);

/// A fresh 64 MiB image (4 KiB clusters, so L2 tables cover 2 MiB each and
/// the writes below need several of them), written at spread offsets.
fn written() -> Written {
    let st = Arc::new(CrashStorage::new(Vec::new()));
    let img = Qcow2::create(
        st.clone(),
        &CreateOptions {
            size: 64 << 20,
            cluster_size: CS,
            ..Default::default()
        },
    )
    .unwrap();
    // One flushed write first: it sets (and syncs) the dirty bit, so what
    // follows is the steady state of a running image.
    img.write(63 << 20, &[0x99; CS as usize], None).unwrap();
    img.flush().unwrap();
    let writes: Vec<(u64, u8)> = (0..24u64)
        .map(|i| ((i * 2_700_000) / CS * CS, 0x40 + i as u8))
        .collect();
    for &(off, p) in &writes {
        img.write(off, &vec![p; 3 * CS as usize], None).unwrap();
    }
    (st, img, writes)
}

fn reopen(bytes: Vec<u8>) -> Qcow2<MemStorage> {
    Qcow2::open(MemStorage::from_vec(bytes), false).expect("reopen (with repair) succeeds")
}

#[test]
fn after_write_back_a_killed_process_loses_nothing() {
    let (st, img, writes) = written();
    img.write_back().unwrap();
    // Killed: the object is never closed or flushed again; the storage
    // keeps what it was given (the operating system's view).
    let bytes = st.current();
    std::mem::forget(img);
    let img = reopen(bytes);
    let mut buf = vec![0u8; 3 * CS as usize];
    for &(off, p) in &writes {
        img.read(off, &mut buf, None).unwrap();
        assert!(buf.iter().all(|&b| b == p), "data at {off} lost");
    }
    let r = img.check().unwrap();
    assert!(r.is_clean(), "{r:?}");
}

/// The control: without the write-back, the tables stay in the process and
/// the same kill loses the writes (so the test above can fail).
#[test]
fn without_write_back_the_same_kill_loses_the_tables() {
    let (st, img, writes) = written();
    let bytes = st.current();
    std::mem::forget(img);
    let img = reopen(bytes);
    let mut buf = vec![0u8; 3 * CS as usize];
    let (off, _) = writes[5];
    img.read(off, &mut buf, None).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "expected the unwritten view");
}

#[test]
fn write_back_asks_for_no_sync_and_a_power_loss_keeps_the_structure_valid() {
    for seed in 0..60u64 {
        let (st, img, _) = written();
        // The dirty bit is already on disk (see `written`), so a
        // write-back has nothing to sync: a power loss right after it
        // keeps none of its writes.
        let before = st.crash(None);
        img.write_back().unwrap();
        assert!(st.crash(None) == before, "write_back synced something");
        let mut rng = Rng::new(seed);
        let bytes = st.crash(Some(&mut rng));
        std::mem::forget(img);
        let img = reopen(bytes);
        let r = img.check().unwrap();
        assert!(r.is_clean(), "seed {seed}: {r:?}");
    }
}
