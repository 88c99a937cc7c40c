//! The two daemons: `blockrep serve` processes spawned from this
//! executable, and the QMP command sequences (QEMU's, from
//! `docs/block-replication.txt` and `docs/COLO-FT.txt`) that build the
//! graphs of DESIGN.md on them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::fault::{Fault, Place};
use super::DemoError;

/// A `blockrep serve` child process, killed when dropped.
pub(crate) struct DaemonProc {
    pub(crate) side: &'static str,
    child: Option<Child>,
    pub(crate) qmp_path: PathBuf,
    pub(crate) log_path: PathBuf,
}

impl DaemonProc {
    /// Spawns `EXE serve --qmp DIR/SIDE.qmp` with its log in `DIR/SIDE.log`.
    pub(crate) fn spawn(dir: &Path, side: &'static str) -> Result<DaemonProc, DemoError> {
        let exe = std::env::current_exe().map_err(|e| DemoError::Daemon {
            side,
            reason: format!("cannot find the blockrep executable: {e}"),
        })?;
        let qmp_path = dir.join(format!("{side}.qmp"));
        let log_path = dir.join(format!("{side}.log"));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| DemoError::io("creating", &log_path, e))?;
        let child = Command::new(&exe)
            .arg("serve")
            .arg("--qmp")
            .arg(&qmp_path)
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| DemoError::Daemon {
                side,
                reason: format!("cannot start {}: {e}", exe.display()),
            })?;
        Ok(DaemonProc {
            side,
            child: Some(child),
            qmp_path,
            log_path,
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Connects and negotiates, waiting up to 20 s for the socket.
    pub(crate) fn connect(&mut self) -> Result<Qmp, DemoError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match qmp::Client::connect_unix(&self.qmp_path) {
                Ok(mut c) => {
                    c.set_timeout(Duration::from_secs(30));
                    return Ok(Qmp {
                        side: self.side,
                        client: c,
                    });
                }
                Err(e) => {
                    if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                        return Err(self.failed(format!("exited ({st}) before listening")));
                    }
                    if Instant::now() > deadline {
                        return Err(self.failed(format!("QMP socket not ready after 20 s: {e}")));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn failed(&self, reason: String) -> DemoError {
        DemoError::Daemon {
            side: self.side,
            reason: format!("{reason}; log:\n{}", self.log_tail(20)),
        }
    }

    /// The last `n` lines of the daemon's log.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGKILL, and reap.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `quit` and waits (up to 30 s) for a clean exit.
    pub(crate) fn quit(&mut self, mut q: Qmp) -> Result<(), DemoError> {
        q.run("quit", json!({}))?;
        drop(q);
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match c.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => {
                    return Err(self.failed(format!("exited with {st} after quit")));
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(self.failed("did not exit within 30 s of quit".into()));
                }
            }
        }
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A negotiated QMP connection to one side.
pub(crate) struct Qmp {
    side: &'static str,
    client: qmp::Client,
}

impl Qmp {
    /// Runs a command; its `return` value.
    pub(crate) fn run(&mut self, command: &str, args: Value) -> Result<Value, DemoError> {
        self.client
            .execute(command, args)
            .map_err(|source| DemoError::Qmp {
                side: self.side,
                command: command.into(),
                source,
            })
    }

    /// Our status of one replication node (`x-blockrep-query-replication`).
    pub(crate) fn replication_status(&mut self, node: &str) -> Result<Value, DemoError> {
        let v = self.run(crate::serve::STATUS_COMMAND, json!({ "node-name": node }))?;
        v.get(0).cloned().ok_or_else(|| DemoError::Replication {
            side: self.side,
            reason: format!("no status for node '{node}': {v}"),
        })
    }
}

/// Node names and export names of the graphs.
pub(crate) mod names {
    /// Secondary: the secondary disk (exported to the primary).
    pub const SECONDARY_DISK: &str = "secondary-disk";
    /// Secondary: the replication filter on top (exported to its guest).
    pub const SECONDARY_TOP: &str = "colo-top";
    /// Primary: the quorum (exported to its guest).
    pub const PRIMARY_QUORUM: &str = "colo-disk0";
    /// Primary: the replication filter in primary mode.
    pub const PRIMARY_REPLICATION: &str = "colo-replication";
    /// Both: the guest's export name.
    pub const GUEST_EXPORT: &str = "disk0";
}

/// Files of the demo directory.
pub(crate) struct Files {
    pub(crate) primary_disk: PathBuf,
    pub(crate) secondary_disk: PathBuf,
    pub(crate) active: PathBuf,
    pub(crate) hidden: PathBuf,
    pub(crate) primary_nbd: PathBuf,
    pub(crate) secondary_nbd: PathBuf,
}

impl Files {
    pub(crate) fn new(dir: &Path) -> Files {
        Files {
            primary_disk: dir.join("primary-disk.raw"),
            secondary_disk: dir.join("secondary-disk.raw"),
            active: dir.join("active.qcow2"),
            hidden: dir.join("hidden.qcow2"),
            primary_nbd: dir.join("primary-nbd.sock"),
            secondary_nbd: dir.join("secondary-nbd.sock"),
        }
    }
}

/// The secondary's graph (QEMU's block-replication.txt, secondary side):
/// the secondary disk, exported writable to the primary over NBD; active
/// (qcow2) over hidden (qcow2) over the secondary disk under a
/// replication(secondary) filter, exported to the secondary guest; then
/// replication started.
/// With a fault on the secondary disk, a blkdebug node goes between the
/// disk and its file.
pub(crate) fn build_secondary(
    q: &mut Qmp,
    f: &Files,
    fault: Option<&Fault>,
) -> Result<(), DemoError> {
    use names::*;
    let file = Fault::wrap(
        fault,
        Place::SecondaryDisk,
        json!({"driver": "file", "filename": f.secondary_disk}),
    );
    q.run(
        "blockdev-add",
        json!({"driver": "raw", "node-name": SECONDARY_DISK, "file": file}),
    )?;
    q.run(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": f.secondary_nbd}}}),
    )?;
    q.run(
        "nbd-server-add",
        json!({"device": SECONDARY_DISK, "name": SECONDARY_DISK, "writable": true}),
    )?;
    q.run(
        "blockdev-add",
        json!({"driver": "replication", "node-name": SECONDARY_TOP, "mode": "secondary",
               "top-id": SECONDARY_TOP,
               "file": {"driver": "qcow2", "node-name": "active-disk",
                        "file": {"driver": "file", "filename": f.active},
                        "backing": {"driver": "qcow2", "node-name": "hidden-disk",
                                    "file": {"driver": "file", "filename": f.hidden},
                                    "backing": SECONDARY_DISK}}}),
    )?;
    q.run(
        "block-export-add",
        json!({"type": "nbd", "id": "secondary-guest", "node-name": SECONDARY_TOP,
               "name": GUEST_EXPORT, "writable": true}),
    )?;
    q.run(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    )?;
    Ok(())
}

/// The primary's graph (COLO-FT.txt, primary side): the local disk under a
/// quorum (vote-threshold=1, read-pattern=fifo); a replication(primary)
/// filter over an NBD client of the secondary disk added to the quorum with
/// `x-blockdev-change`; the quorum exported to the primary guest; then
/// replication started.
/// With a fault on the link, a blkdebug node goes between the replication
/// filter and the NBD client.
pub(crate) fn build_primary(
    q: &mut Qmp,
    f: &Files,
    fault: Option<&Fault>,
) -> Result<(), DemoError> {
    use names::*;
    q.run(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "primary-local",
               "file": {"driver": "file", "filename": f.primary_disk}}),
    )?;
    q.run(
        "blockdev-add",
        json!({"driver": "quorum", "node-name": PRIMARY_QUORUM, "vote-threshold": 1,
               "read-pattern": "fifo", "children": ["primary-local"]}),
    )?;
    let link = Fault::wrap(
        fault,
        Place::Link,
        json!({"driver": "nbd", "node-name": "nbd-to-secondary",
               "export": SECONDARY_DISK,
               "server": {"type": "unix", "path": f.secondary_nbd},
               "reconnect-delay": 0}),
    );
    q.run(
        "blockdev-add",
        json!({"driver": "replication", "node-name": PRIMARY_REPLICATION, "mode": "primary",
               "file": link}),
    )?;
    q.run(
        "x-blockdev-change",
        json!({"parent": PRIMARY_QUORUM, "node": PRIMARY_REPLICATION}),
    )?;
    q.run(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": f.primary_nbd}}}),
    )?;
    q.run(
        "nbd-server-add",
        json!({"device": PRIMARY_QUORUM, "name": GUEST_EXPORT, "writable": true}),
    )?;
    q.run(
        "xen-set-replication",
        json!({"enable": true, "primary": true}),
    )?;
    Ok(())
}
