//! COLO block replication commands, as QEMU's `migration/colo.c` has them
//! (`xen-set-replication`, `query-xen-replication-status`,
//! `xen-colo-do-checkpoint`, `x-colo-lost-heartbeat`), and our status query
//! ([`super::STATUS_COMMAND`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use block_graph::{Graph, Node, NodeRef, ReopenOpts};
use parking_lot::Mutex;

use qmp::{Args, QmpError};
use replication_core::ReplicationMode;
use replication_driver::{Replication, ReplicationState};
use serde_json::{json, Value};

use super::block::generic;
use super::log::log_at;
use super::Daemon;

/// `xen-set-replication`: start every replication node in a mode, or stop
/// them (a failover stop ignores errors, as QEMU does).
pub(crate) fn xen_set_replication(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let enable = a.bool("enable")?;
    let primary = a.bool("primary")?;
    let failover = a.opt_bool("failover");
    if enable && failover.is_some() {
        return Err(QmpError::generic(
            "Parameter 'failover' is only for stopping replication",
        ));
    }
    if enable {
        let mode = if primary {
            ReplicationMode::Primary
        } else {
            ReplicationMode::Secondary
        };
        let opened = if mode == ReplicationMode::Secondary {
            open_protocol_nodes_rw(d).map_err(generic)?
        } else {
            Vec::new()
        };
        if let Err(e) = d.repl.start_all(mode) {
            set_read_only(d, &opened, true);
            return Err(generic(e));
        }
        log_at!(Info, "replication started ({mode})");
    } else {
        let failover = failover.unwrap_or(false);
        let leftovers = if failover {
            failover_candidates(d)
        } else {
            Vec::new()
        };
        let r = d.repl.stop_all(failover);
        watch_failovers(d, leftovers);
        match r {
            Ok(()) => log_at!(Info, "replication stopped (failover={failover})"),
            Err(e) if failover => log_at!(Warn, "replication failover: {e}"),
            Err(e) => return Err(generic(e)),
        }
    }
    Ok(json!({}))
}

/// Replication's start reopens the hidden and secondary disks read-write,
/// as QEMU does; QEMU's reopen takes the nodes' `file` children along,
/// block-graph's does not. So before a secondary start the read-only
/// protocol nodes under those disks (a backing opened read-only passes that
/// on to its nested `file`) are made writable here. Returns them, so a
/// failed start can put them back.
fn open_protocol_nodes_rw(d: &Daemon) -> Result<Vec<NodeRef>, block_graph::Error> {
    let mut queue: Vec<NodeRef> = Vec::new();
    for n in d.graph.nodes() {
        let Some(r) = Replication::of(&n) else {
            continue;
        };
        if r.mode() != ReplicationMode::Secondary || r.state() != ReplicationState::None {
            continue;
        }
        let hidden = n.file().and_then(|active| active.backing());
        let secondary = hidden.as_ref().and_then(|h| h.backing());
        for disk in [hidden, secondary].into_iter().flatten() {
            let mut f = disk.file();
            while let Some(node) = f {
                if node.is_read_only() && !queue.iter().any(|q| Arc::ptr_eq(q, &node)) {
                    queue.push(node.clone());
                }
                f = node.file();
            }
        }
    }
    set_read_only_checked(d, &queue, false)?;
    Ok(queue)
}

fn set_read_only_checked(
    d: &Daemon,
    nodes: &[NodeRef],
    read_only: bool,
) -> Result<(), block_graph::Error> {
    if nodes.is_empty() {
        return Ok(());
    }
    // Deepest first: a writable node may not sit over a read-only child.
    let q: Vec<_> = nodes
        .iter()
        .rev()
        .map(|n| (n.clone(), ReopenOpts { read_only }))
        .collect();
    d.graph.reopen(&q)
}

fn set_read_only(d: &Daemon, nodes: &[NodeRef], read_only: bool) {
    if let Err(e) = set_read_only_checked(d, nodes, read_only) {
        log_at!(Warn, "restoring read-only flags: {e}");
    }
}

/// `query-xen-replication-status`: `{"error": false}` or
/// `{"error": true, "desc": ...}`.
pub(crate) fn query_status(d: &Daemon) -> Result<Value, QmpError> {
    Ok(match d.repl.get_error_all() {
        Ok(()) => json!({"error": false}),
        Err(e) => json!({"error": true, "desc": e.to_string()}),
    })
}

/// `xen-colo-do-checkpoint`.
pub(crate) fn do_checkpoint(d: &Daemon) -> Result<Value, QmpError> {
    d.repl.checkpoint_all().map_err(generic)?;
    log_at!(Debug, "checkpoint done");
    Ok(json!({}))
}

/// `x-colo-lost-heartbeat`: the peer is gone; fail over (stop every
/// replication node with failover; on the secondary this commits the
/// active and hidden disks into the secondary disk in the background).
pub(crate) fn lost_heartbeat(d: &Daemon) -> Result<Value, QmpError> {
    let running = replications(d)
        .iter()
        .any(|r| r.state() == ReplicationState::Running);
    if !running {
        return Err(QmpError::generic("The feature 'colo' is not enabled"));
    }
    log_at!(Info, "lost heartbeat: failing over");
    let leftovers = failover_candidates(d);
    if let Err(e) = d.repl.stop_all(true) {
        log_at!(Warn, "failover: {e}");
    }
    watch_failovers(d, leftovers);
    Ok(json!({}))
}

/// The active and hidden disks of a secondary whose failover commit runs.
/// QEMU's replication drops its references to them once the commit is
/// done (the active disk leaves the chain, replication unrefs the hidden
/// disk), so they are closed when nothing else holds them: nodes the user
/// added by name with `blockdev-add` stay until `blockdev-del`.
pub(crate) struct Leftover {
    repl: Replication,
    nodes: Vec<Weak<Node>>,
}

/// Pending leftovers, shared with the threads waiting for the commits.
pub(crate) type Leftovers = Arc<Mutex<Vec<Leftover>>>;

/// Before a failover stop: the active and hidden disks of every running
/// secondary.
fn failover_candidates(d: &Daemon) -> Vec<Leftover> {
    let mut out = Vec::new();
    for n in d.graph.nodes() {
        let Some(r) = Replication::of(&n) else {
            continue;
        };
        if r.mode() != ReplicationMode::Secondary || r.state() != ReplicationState::Running {
            continue;
        }
        let active = n.file();
        let hidden = active.as_ref().and_then(|a| a.backing());
        let nodes = [active, hidden]
            .into_iter()
            .flatten()
            .map(|x| Arc::downgrade(&x))
            .collect();
        out.push(Leftover { repl: r, nodes });
    }
    out
}

/// Queues the candidates and starts one thread per failover that closes
/// them when its commit ended (commands also reap first, so a client that
/// saw the replication DONE sees the graph without them).
fn watch_failovers(d: &Daemon, leftovers: Vec<Leftover>) {
    for lo in leftovers {
        let repl = lo.repl.clone();
        d.failover_leftovers.lock().push(lo);
        let graph = d.graph.clone();
        let list = Arc::clone(&d.failover_leftovers);
        let _ = std::thread::Builder::new()
            .name(format!("failover-reap-{}", repl.name()))
            .spawn(move || {
                while !repl.wait_failover(Duration::from_secs(3600)) {}
                reap(&graph, &list, true);
            });
    }
}

/// Closes the leftovers of completed failovers (see [`Leftover`]).
pub(crate) fn reap_failover_leftovers(d: &Daemon) {
    reap(&d.graph, &d.failover_leftovers, false);
}

fn reap(graph: &Graph, list: &Mutex<Vec<Leftover>>, last_try: bool) {
    let mut l = list.lock();
    if l.is_empty() {
        return;
    }
    l.retain(|lo| match lo.repl.state() {
        ReplicationState::Failover => !last_try,
        ReplicationState::Done => {
            let all_gone = lo.nodes.iter().all(|w| close_if_unused(graph, w));
            !all_gone && !last_try
        }
        // A failed failover keeps active and hidden in the I/O path.
        _ => false,
    });
}

/// Closes an implicit node nobody uses any more; true when the node is
/// gone or is not ours to close (user-added, or still used).
fn close_if_unused(graph: &Graph, w: &Weak<Node>) -> bool {
    let Some(n) = w.upgrade() else { return true };
    if n.is_removed() {
        return true;
    }
    if !n.is_implicit() {
        return true;
    }
    if !n.parents().is_empty() || n.has_backend() {
        return false;
    }
    // block-graph closes an implicit node when its last parent goes; hang
    // it under a short-lived read-only raw node and remove that.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = format!("blockrep-release{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let name = n.name().to_string();
    drop(n);
    match graph.add_node(
        &json!({"driver": "raw", "node-name": tmp, "read-only": true,
                                 "file": name}),
    ) {
        Ok(_) => {
            if let Err(e) = graph.remove_node(&tmp) {
                log_at!(Warn, "releasing node '{name}': {e}");
                return false;
            }
            log_at!(Info, "failover done: node '{name}' closed");
            true
        }
        Err(e) => {
            log_at!(Warn, "releasing node '{name}': {e}");
            true
        }
    }
}

fn replications(d: &Daemon) -> Vec<Replication> {
    d.graph
        .nodes()
        .iter()
        .filter_map(|n| Replication::of(n))
        .collect()
}

fn status_json(r: &Replication) -> Value {
    let s = r.status();
    let mut v = json!({
        "node-name": s.node_name,
        "mode": s.mode.to_string(),
        "state": s.state.as_str(),
        "error": s.error.is_some(),
        "bytes-forwarded": s.bytes_forwarded,
        "forward-errors": s.forward_errors,
        "clusters-copied-since-checkpoint": s.clusters_copied_since_checkpoint,
        "checkpoints": s.checkpoint_epoch,
    });
    if let Some(e) = s.error {
        v["desc"] = json!(e);
    }
    if let Some(t) = s.last_checkpoint_at {
        let t = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        v["last-checkpoint"] = json!({"seconds": t.as_secs(), "microseconds": t.subsec_micros()});
    }
    if let Some(dur) = s.last_checkpoint_duration {
        v["last-checkpoint-duration-us"] = json!(dur.as_micros() as u64);
    }
    if let Some(dur) = s.failover_duration {
        v["failover-duration-us"] = json!(dur.as_micros() as u64);
    }
    v
}

/// Our status query: one object per replication node (or only `node-name`).
pub(crate) fn blockrep_status(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    if let Some(name) = a.opt_str("node-name") {
        let n = d
            .graph
            .node(name)
            .map_err(|_| QmpError::device_not_found(format!("Cannot find node-name='{name}'")))?;
        let r = Replication::of(&n)
            .ok_or_else(|| QmpError::generic(format!("Node '{name}' is not a replication node")))?;
        return Ok(json!([status_json(&r)]));
    }
    Ok(Value::Array(
        replications(d).iter().map(status_json).collect(),
    ))
}

/// At shutdown: stop every running replication node without failover
/// (before the nodes are closed), so the secondary's backup job ends and
/// its buffers are dropped outside of the graph's drained sections.
pub(crate) fn stop_running(d: &Daemon) {
    for r in replications(d) {
        if r.state() == ReplicationState::Running {
            match r.stop(false) {
                Ok(()) => log_at!(Info, "replication node '{}' stopped", r.name()),
                Err(e) => log_at!(Warn, "stopping replication node '{}': {e}", r.name()),
            }
        }
    }
}
