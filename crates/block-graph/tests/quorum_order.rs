//! Overlapping writes through a quorum of two children with random delays
//! leave both children byte-identical, every time.

use block_graph::*;
use serde_json::json;
use std::sync::Arc;

const SIZE: u64 = 32 * 1024;

fn run_round(round: u64) {
    let g = Graph::new();
    let q = g
        .add_node(&json!({
            "driver": "quorum", "node-name": "q", "vote-threshold": 2,
            "x-parallel-writes": round % 2 == 1,
            "children": [
                {"driver": "blkdebug", "x-delays": [{"iotype": ["write", "write-zeroes", "discard"], "us": 150, "random": true}],
                 "x-seed": round * 2 + 1,
                 "image": {"driver": "memory", "node-name": "local", "size": SIZE, "cluster-size": 4096}},
                {"driver": "blkdebug", "x-delays": [{"iotype": ["write", "write-zeroes", "discard"], "us": 150, "random": true}],
                 "x-seed": round * 2 + 2,
                 "image": {"driver": "memory", "node-name": "secondary", "size": SIZE, "cluster-size": 4096}}
            ]}))
        .unwrap();
    let be = Arc::new(
        g.new_backend_named("guest", &q, PermPair::READ_WRITE)
            .unwrap(),
    );
    let mut hs = Vec::new();
    for t in 0..6u64 {
        let be = be.clone();
        hs.push(std::thread::spawn(move || {
            let mut x = (round << 8) ^ (t + 1) ^ 0x9e37_79b9;
            for i in 0..60u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = x % (SIZE - 1);
                let len = 1 + (x >> 20) % 6000;
                let len = len.min(SIZE - off);
                match i % 10 {
                    0 => be.write_zeroes(off, len, ZeroFlags::default()).unwrap(),
                    1 => be.discard(off, len).unwrap(),
                    _ => {
                        let byte = (t * 40 + i % 40) as u8 + 1;
                        be.write(off, &vec![byte; len as usize], WriteFlags::default())
                            .unwrap()
                    }
                }
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    let (mut a, mut b) = (vec![0u8; SIZE as usize], vec![0u8; SIZE as usize]);
    g.node("local").unwrap().read(0, &mut a).unwrap();
    g.node("secondary").unwrap().read(0, &mut b).unwrap();
    let diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(
        diff, None,
        "round {round}: children differ at byte {diff:?}"
    );
    assert!(
        a.iter().any(|&x| x != 0),
        "round {round}: something was written"
    );
}

#[test]
fn overlapping_writes_reach_both_children_in_one_order() {
    let rounds: u64 = std::env::var("QUORUM_ORDER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    for round in 0..rounds {
        run_round(round);
    }
}
