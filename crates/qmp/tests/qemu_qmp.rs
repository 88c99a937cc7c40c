//! QEMU's own Python QMP library (`qemu.qmp`, PyPI) against our server:
//! connect, negotiate, commands, errors, events, a second client, quit.
//! Requires `python3` with `qemu.qmp` (`pip install qemu.qmp`).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{demo_registry, Probe};
use qmp::{Server, ServerConfig, ShutdownReason};

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
fn qemu_qmp_legacy_client_drives_the_server() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let cfg = ServerConfig::unix(&sock).with_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let server = Server::start(demo_registry(Arc::new(Probe::default())), cfg).unwrap();
    let port = server.tcp_addr().unwrap().port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qemu_qmp_client.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(&sock)
        .arg(port.to_string())
        .spawn()
        .expect("spawn python3");
    // Bounded wait: the script never takes more than a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qemu.qmp client script did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "qemu.qmp client script failed: {status}");
    assert_eq!(
        server
            .shutdown_handle()
            .wait_timeout(Duration::from_secs(5)),
        Some(ShutdownReason::Quit)
    );
    server.join();
    assert!(!sock.exists());
}
