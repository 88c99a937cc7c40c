//! Helpers shared by the integration tests.
#![allow(dead_code)]

use block_graph::{Graph, NodeRef};
use serde_json::json;

/// A memory node of `size` bytes, optionally over `backing`.
pub fn mem(g: &Graph, name: &str, size: u64, backing: Option<&str>) -> NodeRef {
    let mut o = json!({"driver": "memory", "node-name": name, "size": size});
    if let Some(b) = backing {
        o["backing"] = json!(b);
    }
    g.add_node(&o).unwrap()
}

/// Reads the whole node.
pub fn read_all(n: &NodeRef) -> Vec<u8> {
    let mut v = vec![0u8; n.len() as usize];
    n.read(0, &mut v).unwrap();
    v
}

/// A deterministic pattern for (seed, offset) so any byte tells who wrote it.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            (x >> 56) as u8 | 1
        })
        .collect()
}

/// Number of proptest cases: `PROPTEST_CASES` or `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
