//! The harness shared by the `cargo fuzz` target and the hostile-image
//! property test: open arbitrary bytes as an image and use it every way we
//! can. Any outcome but a panic, a hang or a huge allocation is fine.

use crate::image::{BackingRead, Qcow2};
use crate::storage::MemStorage;

/// The most bytes one read of the harness asks for.
const MAX_READ: u64 = 1 << 20;

/// Open `data` read-only and read-write, read, map, write, zero, discard,
/// check, repair, make_empty, grow and close it; errors are ignored.
pub fn exercise(data: &[u8]) {
    for read_only in [true, false] {
        let Ok(img) = Qcow2::open(MemStorage::from_vec(data.to_vec()), read_only) else {
            continue;
        };
        let size = img.size();
        let cs = img.cluster_size();
        let backing = ZeroBacking(size);
        let b: Option<&dyn BackingRead> = Some(&backing);
        let probes = [0, size / 2, size.saturating_sub(MAX_READ)];
        for &p in &probes {
            let n = MAX_READ.min(size - p.min(size)) as usize;
            let mut buf = vec![0u8; n];
            let _ = img.read(p, &mut buf, b);
            let _ = img.map(p, n as u64);
        }
        if !read_only {
            let w = vec![0xa5u8; (cs as usize * 2).min(size as usize)];
            for &p in &probes {
                let p = p.min(size - w.len() as u64);
                let _ = img.write(p, &w, b);
                let _ = img.write(p + 1, &w[..w.len().saturating_sub(1)], None);
                let _ = img.write_zeroes(p, cs.min(size - p), true, b);
                let _ = img.discard(p, cs.min(size - p));
            }
            let _ = img.flush();
            let _ = img.check();
            let _ = img.repair();
            let _ = img.make_empty();
            let _ = img.grow(size.saturating_add(cs));
            let _ = img.close();
        } else {
            let _ = img.check();
        }
    }
}

struct ZeroBacking(u64);

impl BackingRead for ZeroBacking {
    fn backing_len(&self) -> u64 {
        self.0
    }
    fn read_backing(&self, _offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        buf.fill(0x3c);
        Ok(())
    }
}
