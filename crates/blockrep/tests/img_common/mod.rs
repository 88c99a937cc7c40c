//! Helpers for the `blockrep img` tests: run our binary and QEMU's tools in a
//! temporary directory, and poke at qcow2 metadata to make broken images.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Fail with a clear message when a QEMU tool is missing.
pub fn require(tool: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{tool}` is needed by this test but was not found or does not run: \
         install QEMU's tools (Debian/Ubuntu: `apt-get install qemu-utils`)"
    );
}

/// A temporary directory where commands run.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        require("qemu-img");
        require("qemu-io");
        let mut tmp = tempfile::tempdir().expect("temp dir");
        // BLOCKREP_IMG_KEEP=1 keeps the directory to look at after a failure.
        if std::env::var_os("BLOCKREP_IMG_KEEP").is_some() {
            tmp.disable_cleanup(true);
        }
        Dir { tmp }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn run(&self, prog: &str, args: &[&str]) -> Output {
        Command::new(prog)
            .args(args)
            .current_dir(self.tmp.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
    }

    /// `blockrep img ARGS`.
    pub fn br(&self, args: &[&str]) -> Output {
        let mut a = vec!["img"];
        a.extend_from_slice(args);
        self.run(env!("CARGO_BIN_EXE_blockrep"), &a)
    }

    /// `qemu-img ARGS`.
    pub fn qi(&self, args: &[&str]) -> Output {
        self.run("qemu-img", args)
    }

    /// `blockrep img ARGS`, which must succeed.
    pub fn br_ok(&self, args: &[&str]) -> Output {
        let o = self.br(args);
        assert!(
            o.status.success(),
            "blockrep img {args:?} failed: {}",
            text(&o)
        );
        o
    }

    /// `qemu-img ARGS`, which must succeed.
    pub fn qi_ok(&self, args: &[&str]) -> Output {
        let o = self.qi(args);
        assert!(o.status.success(), "qemu-img {args:?} failed: {}", text(&o));
        o
    }

    /// `qemu-io -f FMT -c CMD... FILE`, which must succeed.
    pub fn qio<S: AsRef<str>>(&self, fmt: &str, file: &str, cmds: &[S]) {
        let mut a = vec!["-f", fmt];
        for c in cmds {
            a.push("-c");
            a.push(c.as_ref());
        }
        a.push(file);
        let o = self.run("qemu-io", &a);
        let out = text(&o);
        assert!(
            o.status.success() && !out.contains("error") && !out.contains("failed"),
            "qemu-io {a:?} failed: {out}"
        );
    }

    /// Copy a file inside the directory.
    pub fn cp(&self, from: &str, to: &str) {
        std::fs::copy(self.path(from), self.path(to)).expect("copy");
    }

    /// `qemu-img compare` of two images: true when identical.
    pub fn identical(&self, a: &str, b: &str) -> bool {
        let o = self.qi(&["compare", a, b]);
        match o.status.code() {
            Some(0) => true,
            Some(1) => false,
            _ => panic!("qemu-img compare {a} {b}: {}", text(&o)),
        }
    }

    /// `qemu-img check` must find nothing.
    pub fn assert_clean(&self, img: &str) {
        let o = self.qi(&["check", img]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "qemu-img check {img}: {}",
            text(&o)
        );
    }
}

/// Stdout and stderr of a run, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Parse stdout as JSON.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(o)))
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

/// A qcow2 file's bytes with a few accessors for its metadata.
pub struct Raw {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

impl Raw {
    pub fn load(path: &Path) -> Raw {
        Raw {
            path: path.to_path_buf(),
            bytes: std::fs::read(path).expect("read image"),
        }
    }
    pub fn save(&self) {
        std::fs::write(&self.path, &self.bytes).expect("write image");
    }
    pub fn cluster_size(&self) -> u64 {
        1 << be32(&self.bytes, 20)
    }
    /// Offset of the refcount entry of host cluster `idx` (first refcount block only).
    fn refcount_entry(&self, idx: u64) -> usize {
        let rt = be64(&self.bytes, 48) as usize;
        let rb = be64(&self.bytes, rt) as usize;
        assert!(rb != 0, "no first refcount block");
        assert!(
            idx < self.cluster_size() / 2,
            "cluster {idx} outside the first refcount block"
        );
        rb + 2 * idx as usize
    }
    pub fn set_refcount(&mut self, idx: u64, v: u16) {
        let e = self.refcount_entry(idx);
        self.bytes[e..e + 2].copy_from_slice(&v.to_be_bytes());
    }
    /// Append one cluster to the file and give it refcount 1: one leaked cluster.
    pub fn add_leak(&mut self) {
        let cs = self.cluster_size() as usize;
        let len = self.bytes.len().div_ceil(cs) * cs;
        self.bytes.resize(len + cs, 0);
        self.set_refcount((len / cs) as u64, 1);
    }
    /// Offset in the file of the L2 entry of guest cluster 0.
    pub fn l2_entry0(&self) -> usize {
        let l1 = be64(&self.bytes, 40) as usize;
        let l2 = be64(&self.bytes, l1) & 0x00ff_ffff_ffff_fe00;
        assert!(l2 != 0, "guest cluster 0 has no L2 table");
        l2 as usize
    }
    pub fn l2_get(&self, at: usize) -> u64 {
        be64(&self.bytes, at)
    }
    pub fn l2_set(&mut self, at: usize, v: u64) {
        self.bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
}
