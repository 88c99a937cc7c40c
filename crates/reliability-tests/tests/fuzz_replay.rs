//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/*` at the
//! repository root) through the same functions the `cargo fuzz` targets
//! call, so every input that once found a bug keeps being run on stable in
//! `cargo test --workspace`.

use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

#[test]
fn every_target_has_a_corpus_and_replays_it() {
    for (name, f) in reliability_tests::TARGETS {
        let dir = corpus_dir(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus of {name} at {}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "corpus of {name} is empty");
        for path in files {
            let data = std::fs::read(&path).expect("read corpus file");
            let r = std::panic::catch_unwind(|| f(&data));
            assert!(r.is_ok(), "target {name} panicked on {}", path.display());
        }
    }
}

/// Each target on pseudo-random mutations of its corpus (a cheap stand-in
/// for a fuzzer run; `RELIABILITY_FUZZ_SMOKE=N` inputs per target, default 200).
#[test]
fn every_target_survives_random_mutations_of_its_corpus() {
    let n: u64 = std::env::var("RELIABILITY_FUZZ_SMOKE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (name, f) in reliability_tests::TARGETS {
        let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(corpus_dir(name))
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        seeds.sort();
        for i in 0..n {
            let mut d = seeds[(next() % seeds.len() as u64) as usize].clone();
            for _ in 0..1 + next() % 4 {
                match next() % 3 {
                    0 if !d.is_empty() => {
                        let at = (next() % d.len() as u64) as usize;
                        d[at] = next() as u8;
                    }
                    1 => d.truncate((next() % (d.len() as u64 + 1)) as usize),
                    _ => d.push(next() as u8),
                }
            }
            let r = std::panic::catch_unwind(|| f(&d));
            assert!(r.is_ok(), "target {name} panicked on mutation {i}: {d:?}");
        }
    }
}
