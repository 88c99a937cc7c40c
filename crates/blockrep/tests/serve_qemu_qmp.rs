//! QEMU's own Python QMP library (`qemu.qmp`) drives the daemon: every
//! command at least once, QEMU's error classes and wording, job events.
//! Needs `python3` with `qemu.qmp` (`pip install qemu.qmp`) and `qemu-img`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{qemu_img_create, Daemon};

fn check_python() {
    let out = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed for this test (install python3): {e}"));
    assert!(
        out.status.success(),
        "QEMU's Python QMP library is missing: run `pip install qemu.qmp`\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qemu_qmp_runs_every_command_and_receives_job_events() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    qemu_img_create("qcow2", &dir.path().join("qc0.qcow2"), "4M");
    let mut d = Daemon::start(dir.path(), "daemon");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_qemu_qmp_client.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(&d.qmp_path)
        .arg(dir.path())
        .spawn()
        .expect("spawn python3");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "qemu.qmp client script did not finish within 120 s\n{}",
                d.log(dir.path())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "qemu.qmp client script failed: {status}\ndaemon log:\n{}",
        d.log(dir.path())
    );
    // The script ends with `quit`: the daemon exits cleanly.
    assert_eq!(d.wait(), Some(0), "{}", d.log(dir.path()));
    assert!(!d.qmp_path.exists(), "QMP socket left behind");
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(dir.path().join("qc0.qcow2"))
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
