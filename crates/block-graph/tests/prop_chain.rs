//! Property test: random writes, discards and zero-writes over a random backing
//! chain of memory nodes read back exactly as a flat model computes, and
//! `is_allocated_above` agrees with the model. `PROPTEST_CASES` raises the count.

use block_graph::*;
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone)]
enum Op {
    Write {
        layer: usize,
        off: u64,
        len: u64,
        byte: u8,
    },
    Discard {
        layer: usize,
        off: u64,
        len: u64,
    },
    Zero {
        layer: usize,
        off: u64,
        len: u64,
        unmap: bool,
    },
    MakeEmpty {
        layer: usize,
    },
}

/// The model of one layer, following the memory driver's documented rules.
struct Layer {
    cs: u64,
    size: u64,
    alloc: Vec<bool>,
    data: Vec<u8>,
}

struct Model {
    layers: Vec<Layer>, // 0 = top
}

impl Model {
    fn visible(&self, l: usize, b: u64) -> u8 {
        let layer = &self.layers[l];
        if b >= layer.size {
            return 0;
        }
        if layer.alloc[(b / layer.cs) as usize] {
            layer.data[b as usize]
        } else if l + 1 < self.layers.len() {
            self.visible(l + 1, b)
        } else {
            0
        }
    }

    fn backed(&self, l: usize) -> bool {
        l + 1 < self.layers.len()
    }

    fn cow(&mut self, l: usize, c: u64) {
        if !self.layers[l].alloc[c as usize] {
            let cs = self.layers[l].cs;
            for b in c * cs..(c + 1) * cs {
                let v = if b < self.layers[l].size {
                    self.visible(l, b)
                } else {
                    0
                };
                if (b as usize) < self.layers[l].data.len() {
                    self.layers[l].data[b as usize] = v;
                }
            }
            self.layers[l].alloc[c as usize] = true;
        }
    }

    fn write(&mut self, l: usize, off: u64, len: u64, byte: u8) {
        let cs = self.layers[l].cs;
        for c in off / cs..=(off + len - 1) / cs {
            self.cow(l, c);
        }
        for b in off..off + len {
            self.layers[l].data[b as usize] = byte;
        }
    }

    fn zero(&mut self, l: usize, off: u64, len: u64, unmap: bool) {
        let cs = self.layers[l].cs;
        let end = off + len;
        for c in off / cs..=(end - 1) / cs {
            let (cstart, cend) = (c * cs, (c + 1) * cs);
            let full = off <= cstart && cend <= end;
            if full {
                if unmap && !self.backed(l) {
                    self.layers[l].alloc[c as usize] = false;
                } else {
                    self.layers[l].alloc[c as usize] = true;
                    for b in cstart..cend.min(self.layers[l].size) {
                        self.layers[l].data[b as usize] = 0;
                    }
                }
            } else {
                if !self.layers[l].alloc[c as usize] && !self.backed(l) {
                    continue;
                }
                self.cow(l, c);
                for b in off.max(cstart)..end.min(cend) {
                    self.layers[l].data[b as usize] = 0;
                }
            }
        }
    }

    /// Allocated in any of layers [0, base)?
    fn allocated_above(&self, base: usize, b: u64) -> bool {
        (0..base).any(|l| {
            b < self.layers[l].size && self.layers[l].alloc[(b / self.layers[l].cs) as usize]
        })
    }
}

fn chain_strategy() -> impl Strategy<Value = Vec<(u64, u64)>> {
    // (size, cluster size) per layer, top first; sizes are multiples of 4 KiB
    // so every cluster size divides them.
    prop::collection::vec(
        (
            (2u64..=6).prop_map(|k| k * 4096),
            prop::sample::select(vec![512u64, 1024, 4096]),
        ),
        1..=4,
    )
}

fn ops_strategy(nlayers: usize, max: u64) -> impl Strategy<Value = Vec<Op>> {
    let op = (
        0..nlayers,
        0..max,
        1u64..9000,
        any::<u8>(),
        0u8..10,
        any::<bool>(),
    )
        .prop_map(|(layer, off, len, byte, kind, unmap)| match kind {
            0..=5 => Op::Write {
                layer,
                off,
                len,
                byte: byte | 1,
            },
            6 => Op::Discard { layer, off, len },
            7 | 8 => Op::Zero {
                layer,
                off,
                len,
                unmap,
            },
            _ => Op::MakeEmpty { layer },
        });
    prop::collection::vec(op, 1..40)
}

fn check(
    chain: Vec<(u64, u64)>,
    ops: Vec<Op>,
    probes: Vec<(u64, u64, usize)>,
) -> Result<(), TestCaseError> {
    let g = Graph::new();
    let n = chain.len();
    let mut nodes: Vec<NodeRef> = Vec::new();
    // Build bottom-up.
    for (i, (size, cs)) in chain.iter().enumerate().rev() {
        let mut o = json!({"driver": "memory", "node-name": format!("l{i}"), "size": size, "cluster-size": cs});
        if i + 1 < n {
            o["backing"] = json!(format!("l{}", i + 1));
        }
        nodes.push(g.add_node(&o).unwrap());
    }
    nodes.reverse();
    let mut m = Model {
        layers: chain
            .iter()
            .map(|&(size, cs)| Layer {
                cs,
                size,
                alloc: vec![false; size.div_ceil(cs) as usize],
                data: vec![0; size as usize],
            })
            .collect(),
    };
    for op in &ops {
        match *op {
            Op::Write {
                layer,
                off,
                len,
                byte,
            } => {
                let size = m.layers[layer].size;
                let off = off % size;
                let len = len.min(size - off);
                nodes[layer]
                    .write(off, &vec![byte; len as usize], WriteFlags::default())
                    .unwrap();
                m.write(layer, off, len, byte);
            }
            Op::Discard { layer, off, len } => {
                let size = m.layers[layer].size;
                let off = off % size;
                let len = len.min(size - off);
                nodes[layer].discard(off, len).unwrap();
                m.zero(layer, off, len, true);
            }
            Op::Zero {
                layer,
                off,
                len,
                unmap,
            } => {
                let size = m.layers[layer].size;
                let off = off % size;
                let len = len.min(size - off);
                nodes[layer]
                    .write_zeroes(
                        off,
                        len,
                        ZeroFlags {
                            may_unmap: unmap,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                m.zero(layer, off, len, unmap);
            }
            Op::MakeEmpty { layer } => {
                nodes[layer].make_empty().unwrap();
                let l = &mut m.layers[layer];
                l.alloc.iter_mut().for_each(|a| *a = false);
            }
        }
    }
    // Every layer reads back as the model says.
    for (l, node) in nodes.iter().enumerate() {
        let mut buf = vec![0u8; node.len() as usize];
        node.read(0, &mut buf).unwrap();
        for (b, &got) in buf.iter().enumerate() {
            let want = m.visible(l, b as u64);
            prop_assert_eq!(got, want, "layer {} byte {}", l, b);
        }
    }
    // is_allocated_above agrees, for random (offset, len, base) probes.
    let top = &nodes[0];
    for (off, len, base) in probes {
        let size = top.len();
        let off = off % size;
        let len = len.clamp(1, size - off);
        let base_idx = base % (n + 1); // n means "no base"
        let base_node = if base_idx < n {
            Some(&nodes[base_idx])
        } else {
            None
        };
        let limit = if base_idx < n { base_idx } else { n };
        let (alloc, run) = g.is_allocated_above(top, base_node, off, len).unwrap();
        prop_assert!(run >= 1 && run <= len, "run {} for len {}", run, len);
        for b in off..off + run {
            prop_assert_eq!(
                alloc,
                m.allocated_above(limit, b),
                "is_allocated_above(base {}) at byte {} (asked {}+{}, run {})",
                base_idx,
                b,
                off,
                len,
                run
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(64),
        .. ProptestConfig::default()
    })]

    #[test]
    fn chain_reads_and_allocation_match_model(
        (chain, ops) in chain_strategy().prop_flat_map(|c| {
            let n = c.len();
            let max = c.iter().map(|x| x.0).max().unwrap_or(4096);
            (Just(c), ops_strategy(n, max))
        }),
        probes in prop::collection::vec((any::<u64>(), 1u64..30000, any::<usize>()), 1..20),
    ) {
        check(chain, ops, probes)?;
    }
}
