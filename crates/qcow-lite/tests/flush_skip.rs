//! A flush with nothing changed since the last one does not reach the
//! storage (an `fdatasync` of an untouched file still flushes the device's
//! cache), and a flush after any change always does.

mod common;

use common::CountingStorage as Counting;
use qcow_lite::{CreateOptions, MemStorage, Qcow2};
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn flushes(st: &Counting) -> u64 {
    st.flushes.load(Ordering::SeqCst)
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
    let after_create = flushes(&st);
    assert!(after_create > 0);
    img.flush().unwrap();
    img.flush().unwrap();
    assert_eq!(flushes(&st), after_create);
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
    assert_eq!(flushes(&st), 0);
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
            let before = flushes(&st);
            img.flush().unwrap();
            assert!(flushes(&st) > before, "{what}: flush {n} was skipped");
        }
        let settled = flushes(&st);
        img.flush().unwrap();
        assert_eq!(
            flushes(&st),
            settled,
            "{what}: a flush with nothing changed reached the storage"
        );
    }
}
