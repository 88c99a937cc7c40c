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
