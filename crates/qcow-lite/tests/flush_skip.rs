//! A flush with nothing changed since the last one does not reach the
//! storage (an `fdatasync` of an untouched file still flushes the device's
//! cache), and a flush after any change always does.

use qcow_lite::{CreateOptions, MemStorage, Qcow2, Storage};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Memory storage that counts the flushes it is asked for.
#[derive(Default)]
struct Counting {
    inner: MemStorage,
    flushes: AtomicUsize,
}

impl Counting {
    fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }
}

impl Storage for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

const CS: u64 = 65536;

fn created() -> (Arc<Counting>, Qcow2<Arc<Counting>>) {
    let st = Arc::new(Counting::default());
    let img = Qcow2::create(
        st.clone(),
        &CreateOptions {
            size: 64 << 20,
            cluster_size: CS,
            ..Default::default()
        },
    )
    .unwrap();
    (st, img)
}

#[test]
fn a_new_image_is_flushed_once_then_not_again() {
    let (st, img) = created();
    // create closes the image: its header and tables are durable.
    let after_create = st.flushes();
    assert!(after_create > 0);
    img.flush().unwrap();
    img.flush().unwrap();
    assert_eq!(st.flushes(), after_create);
}

#[test]
fn an_image_opened_and_only_read_is_never_flushed() {
    let (st, img) = created();
    img.write(0, &[0x5a; CS as usize], None).unwrap();
    img.close().unwrap();
    drop(img);
    let bytes = st.inner.to_vec();

    let st = Arc::new(Counting {
        inner: MemStorage::from_vec(bytes),
        ..Default::default()
    });
    let img = Qcow2::open(st.clone(), false).unwrap();
    let mut buf = vec![0u8; CS as usize];
    img.read(0, &mut buf, None).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    img.flush().unwrap();
    img.close().unwrap();
    assert_eq!(st.flushes(), 0);
}

#[test]
fn every_kind_of_change_makes_the_next_flush_reach_the_storage() {
    let (st, img) = created();
    img.flush().unwrap();
    type Change = fn(&Qcow2<Arc<Counting>>);
    // (what, change, flushes that reach the storage after it): the file
    // shrink a make_empty defers happens once a flush made the emptied
    // tables durable, and that shrink is itself a change to flush.
    let changes: [(&str, Change, usize); 5] = [
        (
            "data write into a new cluster",
            |i| i.write(3 * CS, &[1; 4096], None).unwrap(),
            1,
        ),
        (
            "data write into an allocated cluster",
            |i| i.write(3 * CS + 4096, &[2; 4096], None).unwrap(),
            1,
        ),
        (
            "zeroing",
            |i| i.write_zeroes(3 * CS, CS, false, None).unwrap(),
            1,
        ),
        ("discard", |i| i.discard(3 * CS, CS).unwrap(), 1),
        ("make_empty", |i| i.make_empty().unwrap(), 2),
    ];
    for (what, change, reaching) in changes {
        change(&img);
        for n in 0..reaching {
            let before = st.flushes();
            img.flush().unwrap();
            assert!(st.flushes() > before, "{what}: flush {n} was skipped");
        }
        let settled = st.flushes();
        img.flush().unwrap();
        assert_eq!(
            st.flushes(),
            settled,
            "{what}: a flush with nothing changed reached the storage"
        );
    }
}
