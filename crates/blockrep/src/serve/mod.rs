//! `blockrep serve`: the daemon. One block graph, driven over QMP with QEMU's
//! command names and argument shapes, disks exported over NBD, block jobs and
//! COLO block replication.
//!
//! Extensions of ours follow QEMU's convention for experimental/extension
//! commands (an `x-` prefix): [`STATUS_COMMAND`] reports what QEMU has no
//! query for (per replication node state, bytes forwarded, clusters copied
//! since the checkpoint, last checkpoint time and duration, errors). The
//! in-memory driver is `memory` (QEMU has none).
//!
//! Commands (argument shapes in `schema.rs`, QEMU's): `blockdev-add`,
//! `blockdev-del`, `query-named-block-nodes`, `query-block`,
//! `query-blockstats`, `x-blockdev-change`, `block_resize`,
//! `nbd-server-start`, `nbd-server-add`, `block-export-add` (type `nbd`),
//! `block-export-del`, `query-block-exports`, `nbd-server-remove`,
//! `nbd-server-stop`, `blockdev-backup`, `block-commit` (active and
//! intermediate), `blockdev-mirror`, `block-stream`, `query-block-jobs`,
//! `block-job-cancel`/`-pause`/`-resume`/`-complete`/`-set-speed`,
//! `query-jobs`, `job-pause`/`-resume`/`-cancel`/`-complete`/`-finalize`/
//! `-dismiss`, `xen-set-replication`, `query-xen-replication-status`,
//! `xen-colo-do-checkpoint`, `x-colo-lost-heartbeat`, the status command,
//! and the protocol's own `qmp_capabilities`, `query-version`,
//! `query-commands`, `quit`. Events: `JOB_STATUS_CHANGE {id, status}`,
//! `BLOCK_JOB_READY`, `BLOCK_JOB_COMPLETED` (`error` on failure: the
//! errno's text, as QEMU), `BLOCK_JOB_CANCELLED` (all `{type, device, len,
//! offset, speed}`), `BLOCK_JOB_ERROR {device, operation, action}`,
//! `BLOCK_EXPORT_DELETED {id}` (`block-export-del`, `nbd-server-remove`,
//! `nbd-server-stop`).
//!
//! `block_resize {device?, node-name?, size}`: `device` names a block
//! backend (our export ids, as `query-block` lists them) or, since we have
//! no guest devices, a node (QEMU would refuse that); `node-name` a node.
//! Grows the node (shrinks where the driver can: `memory`, `file`, `raw`;
//! qcow2 only grows). Refused while an op blocker covers resize: on the
//! `top-id` node of a running replication with "Device 'top' is in use: "
//! and the blocker's reason (in use by internal backup job, as for jobs on that
//! node). A filter node (e.g. `replication` after failover) cannot be
//! resized: block-graph does not pass truncate through filters yet; resize
//! the node below it.
//!
//! Jobs: `query-jobs` lists QEMU's `JobInfo` (`id`, `type`, `status`,
//! `current-progress`, `total-progress`, `error` once failed); internal
//! jobs (replication's backup and failover commit) are never listed nor
//! reachable by id. Our jobs always finalize themselves (`auto-finalize:
//! false` is refused): `job-finalize` is accepted only in `pending`, as
//! QEMU's verb table says, where it has nothing left to do; everywhere else
//! it fails with QEMU's "Job 'x' in state 's' cannot accept command verb
//! 'finalize'". `job-complete` is accepted in `ready` and `standby` (a
//! paused ready job completes once resumed), `job-cancel` is always a
//! forced cancel, an unknown id is "Job not found".
//!
//! Failover: once a secondary's failover commit completed, its active and
//! hidden disks (out of the I/O path by then) are closed and leave the
//! graph, as QEMU drops its last references to them; disks the user added
//! by name with `blockdev-add` stay until `blockdev-del`, as in QEMU.
//!
//! Error classes: a `device` argument naming no node is `DeviceNotFound`
//! ("Cannot find device='x' nor node-name='x'"); an unknown block job is
//! `DeviceNotActive` ("Block job 'x' not found"), as QEMU; everything else
//! is `GenericError` (`block_resize`'s lookup too, as QEMU's
//! `bdrv_lookup_bs`: "Cannot find device='d' nor node-name='n'"). A failing command leaves the graph as it was.
//!
//! Not supported (refused with a GenericError naming the option): TLS,
//! dirty bitmaps, `auto-finalize: false`, `filter-node-name`, mirror
//! `replaces` and `copy-mode: write-blocking`, `block-stream`'s `bottom`,
//! compressed backup, export types other than NBD.

mod block;
mod export;
mod jobs;
pub(crate) mod log;
mod repl;
mod schema;
mod signals;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use block_graph::Graph;
use block_jobs::JobManager;
use parking_lot::Mutex;
use qmp::{EventEmitter, QmpError, Registry, Server, ServerConfig, ShutdownReason};
use replication_core::StateRegistry;

use log::log_at;

/// Name of our replication status command (QEMU's `x-` extension convention).
pub const STATUS_COMMAND: &str = "x-blockrep-query-replication";

/// Arguments of `blockrep serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// QMP Unix socket path (created; a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub qmp: PathBuf,
    /// Also serve QMP on TCP (e.g. 127.0.0.1:4444).
    #[arg(long, value_name = "ADDR:PORT")]
    pub qmp_tcp: Option<SocketAddr>,
    /// Log level on stderr.
    #[arg(long, value_enum, default_value = "info")]
    pub log_level: log::Level,
}

/// The daemon's state shared by every command handler.
pub(crate) struct Daemon {
    pub(crate) graph: Graph,
    pub(crate) jobs: JobManager,
    pub(crate) repl: replication_core::Registry,
    #[allow(dead_code)] // kept alive: the replication nodes register their state here
    pub(crate) states: StateRegistry,
    pub(crate) nbd: Mutex<Option<export::NbdState>>,
    pub(crate) events: EventEmitter,
    /// What QMP reports of user jobs beyond block-jobs' `JobInfo`.
    pub(crate) job_meta: jobs::MetaMap,
    /// Active/hidden disks to close once a running failover completes.
    pub(crate) failover_leftovers: repl::Leftovers,
}

impl Daemon {
    fn new(events: EventEmitter) -> Daemon {
        let graph = Graph::new();
        let repl = replication_core::Registry::new();
        let states = StateRegistry::new();
        block_jobs::register_drivers(&graph);
        replication_driver::register(&graph, &repl, Some(&states));
        qcow_lite::register(&graph);
        nbd::blockdev::register(&graph);
        Daemon {
            graph,
            jobs: JobManager::new(),
            repl,
            states,
            nbd: Mutex::new(None),
            events,
            job_meta: jobs::MetaMap::default(),
            failover_leftovers: repl::Leftovers::default(),
        }
    }

    /// Orderly shutdown: exports drained and removed, jobs cancelled, every
    /// node closed (images flushed and closed cleanly).
    fn shutdown(&self) {
        export::stop_server(self);
        repl::stop_running(self);
        for job in self.jobs.all() {
            if !job.is_internal() && job.outcome().is_none() {
                let _ = job.cancel(true);
            }
        }
        for job in self.jobs.all() {
            if !job.is_internal() {
                let _ = job.wait_timeout(std::time::Duration::from_secs(10));
            }
        }
        block::close_all(&self.graph);
    }
}

/// Builds the QMP registry with every command of the daemon.
pub(crate) fn build_registry() -> Result<(Registry, Arc<Daemon>), qmp::Error> {
    let mut reg = Registry::new();
    reg.define(schema::TYPES)?;
    let daemon = Arc::new(Daemon::new(reg.events()));
    for (name, args) in schema::COMMANDS {
        let d = Arc::clone(&daemon);
        let cmd = *name;
        reg.register(name, args, move |a| {
            log_at!(Debug, "qmp: {cmd} {}", a.to_value());
            let r = dispatch(&d, cmd, a);
            if let Err(e) = &r {
                log_at!(Info, "qmp: {cmd} failed: {} {}", e.class, e.desc);
            }
            r
        })?;
    }
    jobs::forward_events(&daemon);
    Ok((reg, daemon))
}

fn dispatch(d: &Daemon, cmd: &str, a: &qmp::Args) -> Result<serde_json::Value, QmpError> {
    // Nodes a completed failover left without users go before any command
    // looks at the graph (see `repl::reap_failover_leftovers`).
    repl::reap_failover_leftovers(d);
    match cmd {
        "blockdev-add" => block::blockdev_add(d, a),
        "blockdev-del" => block::blockdev_del(d, a),
        "query-named-block-nodes" => block::query_named_block_nodes(d, a),
        "query-block" => block::query_block(d),
        "query-blockstats" => block::query_blockstats(d, a),
        "x-blockdev-change" => block::x_blockdev_change(d, a),
        "nbd-server-start" => export::nbd_server_start(d, a),
        "nbd-server-add" => export::nbd_server_add(d, a),
        "block-export-add" => export::block_export_add(d, a),
        "nbd-server-remove" => export::nbd_server_remove(d, a),
        "nbd-server-stop" => export::nbd_server_stop(d),
        "blockdev-backup" => jobs::blockdev_backup(d, a),
        "block-commit" => jobs::block_commit(d, a),
        "blockdev-mirror" => jobs::blockdev_mirror(d, a),
        "block-stream" => jobs::block_stream(d, a),
        "query-block-jobs" => jobs::query_block_jobs(d),
        "block-job-cancel" => jobs::block_job_cancel(d, a),
        "block-job-pause" => jobs::block_job_verb(d, a, jobs::Verb::Pause),
        "block-job-resume" => jobs::block_job_verb(d, a, jobs::Verb::Resume),
        "block-job-complete" => jobs::block_job_verb(d, a, jobs::Verb::Complete),
        "block-job-set-speed" => jobs::block_job_set_speed(d, a),
        "query-jobs" => jobs::query_jobs(d),
        "job-pause" => jobs::job_verb(d, a, jobs::Verb::Pause),
        "job-resume" => jobs::job_verb(d, a, jobs::Verb::Resume),
        "job-cancel" => jobs::job_verb(d, a, jobs::Verb::Cancel),
        "job-complete" => jobs::job_verb(d, a, jobs::Verb::Complete),
        "job-finalize" => jobs::job_verb(d, a, jobs::Verb::Finalize),
        "job-dismiss" => jobs::job_dismiss(d, a),
        "block_resize" => block::block_resize(d, a),
        "block-export-del" => export::block_export_del(d, a),
        "query-block-exports" => export::query_block_exports(d),
        "xen-set-replication" => repl::xen_set_replication(d, a),
        "query-xen-replication-status" => repl::query_status(d),
        "xen-colo-do-checkpoint" => repl::do_checkpoint(d),
        "x-colo-lost-heartbeat" => repl::lost_heartbeat(d),
        STATUS_COMMAND => repl::blockrep_status(d, a),
        other => Err(QmpError::command_not_found(format!(
            "The command {other} has not been found"
        ))),
    }
}

/// Runs the daemon until `quit`, SIGTERM or SIGINT.
pub fn run(args: Args) -> ExitCode {
    log::set_level(args.log_level);
    // Block SIGTERM/SIGINT before any thread starts, so only the signal
    // thread receives them.
    let signals = match signals::Signals::block() {
        Ok(s) => s,
        Err(e) => {
            log_at!(Error, "cannot set up signal handling: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (reg, daemon) = match build_registry() {
        Ok(x) => x,
        Err(e) => {
            log_at!(Error, "internal error building the QMP schema: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cfg = ServerConfig::unix(&args.qmp);
    if let Some(t) = args.qmp_tcp {
        cfg = cfg.with_tcp(t);
    }
    let server = match Server::start(reg, cfg) {
        Ok(s) => s,
        Err(e) => {
            log_at!(Error, "cannot listen on {}: {e}", args.qmp.display());
            return ExitCode::FAILURE;
        }
    };
    log_at!(
        Info,
        "QMP listening on {}{}",
        args.qmp.display(),
        server
            .tcp_addr()
            .map(|a| format!(" and tcp {a}"))
            .unwrap_or_default()
    );
    let stop = server.shutdown_handle();
    signals.spawn_waiter(move |sig| {
        log_at!(Info, "received signal {sig}, shutting down");
        stop.shutdown();
    });
    let reason = server.wait();
    log_at!(
        Info,
        "shutting down ({})",
        match reason {
            ShutdownReason::Quit => "quit",
            ShutdownReason::Requested => "signal",
        }
    );
    // Stop taking commands first, then take the graph apart.
    server.join();
    daemon.shutdown();
    log_at!(Info, "stopped");
    ExitCode::SUCCESS
}
