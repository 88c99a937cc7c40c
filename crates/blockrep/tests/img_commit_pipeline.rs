//! `img commit` of an overlay larger than its read-ahead queue (4 x 2 MiB),
//! into a qcow2 base that is partly allocated already: the reader and writer
//! threads overlap, in-place and freshly allocated multi-cluster runs mix,
//! and unaligned pieces need copy-on-write; over 32 MiB of data is written,
//! so the base's early writeback starts mid-copy. The result must match
//! qemu-img's and hold the exact bytes.

mod img_common;

use img_common::{json, Dir};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// The data run at the end of the image.
const TAIL: u64 = 40 * MIB;

/// base.qcow2 (0x11 over 3-9 MiB) <- top.qcow2 (several patterns, zeros, holes),
/// copied into ours/ and qemu/.
fn chain(d: &Dir) {
    let size = SIZE.to_string();
    d.qi_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", &size]);
    d.qio(
        "qcow2",
        "base.qcow2",
        &[format!("write -P 0x11 {} {}", 3 * MIB, 6 * MIB)],
    );
    d.qi_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        &size,
    ]);
    d.qio(
        "qcow2",
        "top.qcow2",
        &[
            // Over the allocated part of the base and past it, unaligned.
            format!("write -P 0x5a {} {}", 2 * MIB + 4096, 10 * MIB),
            // A zeroed range inside it.
            format!("write -z {} {}", 5 * MIB, MIB),
            // Scattered single clusters and a partial one.
            format!("write -P 0x66 {} 65536", 14 * MIB),
            format!("write -P 0x67 {} 65536", 14 * MIB + 196608),
            format!("write -P 0x68 {} 1000", 16 * MIB + 300),
            // The last 40 MiB, crossing 2 MiB chunk boundaries.
            format!("write -P 0x77 {} {}", SIZE - TAIL, TAIL),
        ],
    );
    for sub in ["ours", "qemu"] {
        std::fs::create_dir(d.path(sub)).unwrap();
        for f in ["base.qcow2", "top.qcow2"] {
            d.cp(f, &format!("{sub}/{f}"));
        }
    }
}

#[test]
fn commit_through_the_pipeline_matches_qemu_byte_for_byte() {
    let d = Dir::new();
    chain(&d);
    d.br_ok(&["commit", "-q", "ours/top.qcow2"]);
    d.qi_ok(&["commit", "-q", "qemu/top.qcow2"]);
    for sub in ["ours", "qemu"] {
        d.assert_clean(&format!("{sub}/base.qcow2"));
    }
    assert!(
        d.identical("ours/base.qcow2", "qemu/base.qcow2"),
        "base differs from qemu-img's"
    );
    assert!(
        d.identical("ours/top.qcow2", "qemu/top.qcow2"),
        "top differs from qemu-img's"
    );
    let reads = [
        format!("read -P 0 0 {}", 2 * MIB + 4096),
        format!("read -P 0x5a {} {}", 2 * MIB + 4096, 3 * MIB - 4096),
        format!("read -P 0 {} {}", 5 * MIB, MIB),
        format!("read -P 0x5a {} {}", 6 * MIB, 6 * MIB + 4096),
        format!("read -P 0 {} {}", 12 * MIB + 4096, 2 * MIB - 4096),
        format!("read -P 0x66 {} 65536", 14 * MIB),
        format!("read -P 0 {} 131072", 14 * MIB + 65536),
        format!("read -P 0x67 {} 65536", 14 * MIB + 196608),
        format!("read -P 0 {} 300", 16 * MIB),
        format!("read -P 0x68 {} 1000", 16 * MIB + 300),
        format!(
            "read -P 0 {} {}",
            16 * MIB + 1300,
            SIZE - TAIL - 16 * MIB - 1300
        ),
        format!("read -P 0x77 {} {}", SIZE - TAIL, TAIL),
    ];
    d.qio("qcow2", "ours/base.qcow2", &reads);
    // The top was emptied: everything now comes from the base.
    let m = json(&d.qi_ok(&["map", "--output=json", "ours/top.qcow2"]));
    assert!(
        m.as_array().unwrap().iter().all(|e| e["depth"] != 0),
        "top not emptied: {m}"
    );
}
