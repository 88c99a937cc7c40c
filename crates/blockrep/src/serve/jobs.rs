//! Block job commands (`blockdev-backup`, `block-commit`, `blockdev-mirror`,
//! `block-stream`, `query-block-jobs`, `block-job-*`, `job-dismiss`) and the
//! forwarding of job events as QEMU's QMP events. The jobs themselves are
//! `block-jobs`' (backup, mirror, active and plain commit, stream).

use std::sync::Arc;

use block_graph::{BlockOp, Graph, NodeRef};
use block_jobs::{
    BackupJob, BackupOptions, BackupSync, CommitJob, CommitOptions, JobError, JobEvent, JobInfo,
    JobOptions, MirrorJob, MirrorOptions, MirrorSync, OnError, StreamJob,
};
use qmp::{Args, QmpError};
use serde_json::{json, Value};

use super::block::{generic, lookup_device};
use super::log::log_at;
use super::Daemon;

fn jerr(e: JobError) -> QmpError {
    QmpError::generic(e.context().to_string())
}

fn on_error(a: &Args, key: &str) -> Result<OnError, QmpError> {
    match a.opt_str(key) {
        None => Ok(OnError::Report),
        Some(s) => OnError::parse(s).map_err(jerr),
    }
}

fn job_options(a: &Args, default_id: &str) -> Result<JobOptions, QmpError> {
    let speed = a.opt_i64("speed").unwrap_or(0);
    if speed < 0 {
        return Err(QmpError::generic(
            "Parameter 'speed' expects a non-negative value",
        ));
    }
    if a.opt_bool("auto-finalize") == Some(false) {
        return Err(QmpError::generic(
            "auto-finalize=false is not supported (jobs finalize themselves)",
        ));
    }
    let (src, tgt) = if a.has("on-error") {
        let e = on_error(a, "on-error")?;
        (e, e)
    } else {
        (
            on_error(a, "on-source-error")?,
            on_error(a, "on-target-error")?,
        )
    };
    Ok(JobOptions {
        id: Some(a.opt_str("job-id").unwrap_or(default_id).to_string()),
        speed: speed as u64,
        auto_dismiss: a.opt_bool("auto-dismiss").unwrap_or(true),
        on_source_error: src,
        on_target_error: tgt,
    })
}

fn refuse(a: &Args, keys: &[&str]) -> Result<(), QmpError> {
    for k in keys {
        if a.has(k) {
            return Err(QmpError::generic(format!(
                "Parameter '{k}' is not supported"
            )));
        }
    }
    Ok(())
}

fn check_id_free(d: &Daemon, o: &JobOptions) -> Result<(), QmpError> {
    if let Some(id) = &o.id {
        if d.jobs.find(id).is_ok() {
            return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
        }
    }
    Ok(())
}

/// `blockdev-backup`.
pub(crate) fn blockdev_backup(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    refuse(a, &["bitmap", "filter-node-name"])?;
    if a.opt_bool("compress") == Some(true) {
        return Err(QmpError::generic("Compression is not supported"));
    }
    let device = a.str("device")?;
    let src = lookup_device(d, device)?;
    let target = lookup_device(d, a.str("target")?)?;
    let sync = match a.str("sync")? {
        s @ ("incremental" | "bitmap") => {
            return Err(QmpError::generic(format!(
                "sync mode '{s}' is not supported"
            )))
        }
        s => BackupSync::parse(s).map_err(jerr)?,
    };
    let job = job_options(a, device)?;
    check_id_free(d, &job)?;
    let bj = BackupJob::start(
        &d.jobs,
        &d.graph,
        &src,
        &target,
        BackupOptions {
            sync,
            cluster_size: None,
            job,
        },
    )
    .map_err(jerr)?;
    log_at!(Info, "backup job '{}' started", bj.job().id().unwrap_or(""));
    Ok(json!({}))
}

/// `blockdev-mirror`.
pub(crate) fn blockdev_mirror(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    refuse(a, &["replaces", "filter-node-name"])?;
    if a.opt_str("copy-mode") == Some("write-blocking") {
        return Err(QmpError::generic(
            "copy-mode 'write-blocking' is not supported",
        ));
    }
    let device = a.str("device")?;
    let src = lookup_device(d, device)?;
    let target = lookup_device(d, a.str("target")?)?;
    let sync = match a.str("sync")? {
        s @ ("incremental" | "bitmap") => {
            return Err(QmpError::generic(format!(
                "sync mode '{s}' is not supported"
            )))
        }
        s => MirrorSync::parse(s).map_err(jerr)?,
    };
    let granularity = a.opt_u64("granularity").unwrap_or(65536);
    if !(512..=64 << 20).contains(&granularity) || !granularity.is_power_of_two() {
        return Err(QmpError::generic(
            "Granularity must be a power of 2 between 512 and 64M",
        ));
    }
    if src.len() != target.len() {
        return Err(QmpError::generic(format!(
            "Source and target image have different sizes ({} and {})",
            src.len(),
            target.len()
        )));
    }
    let job = job_options(a, device)?;
    check_id_free(d, &job)?;
    let mj = MirrorJob::start(
        &d.jobs,
        &d.graph,
        &src,
        &target,
        MirrorOptions {
            sync,
            granularity,
            job,
            ..MirrorOptions::default()
        },
    )
    .map_err(jerr)?;
    log_at!(Info, "mirror job '{}' started", mj.job().id().unwrap_or(""));
    Ok(json!({}))
}

/// Finds `name` (a node-name, or a file name as QEMU's `base`/`top`
/// accept) in the backing chain of `top`.
fn in_chain(
    g: &Graph,
    top: &NodeRef,
    node_name: Option<&str>,
    file_name: Option<&str>,
    what: &str,
) -> Result<Option<NodeRef>, QmpError> {
    let chain = g.backing_chain(top);
    if let Some(n) = node_name {
        return chain
            .into_iter()
            .find(|c| c.name() == n)
            .map(Some)
            .ok_or_else(|| {
                QmpError::generic(format!(
                    "Node '{n}' is not in the backing chain of '{}' ({what})",
                    top.name()
                ))
            });
    }
    if let Some(f) = file_name {
        return chain
            .into_iter()
            .find(|c| c.filename().as_deref() == Some(f) || c.name() == f)
            .map(Some)
            .ok_or_else(|| QmpError::generic(format!("Can't find '{f}' in the backing chain")));
    }
    Ok(None)
}

/// `block-commit`: active commit when `top` is the device itself (ready,
/// then `block-job-complete`), else an intermediate commit.
pub(crate) fn block_commit(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    refuse(a, &["filter-node-name"])?;
    if a.has("base") && a.has("base-node") {
        return Err(QmpError::generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if a.has("top") && a.has("top-node") {
        return Err(QmpError::generic(
            "'top' and 'top-node' cannot be specified at the same time",
        ));
    }
    let device = a.str("device")?;
    let root = lookup_device(d, device)?;
    // QEMU checks the device's blockers first.
    root.check_op(BlockOp::CommitSource).map_err(generic)?;
    let top = in_chain(
        &d.graph,
        &root,
        a.opt_str("top-node"),
        a.opt_str("top"),
        "top",
    )?
    .unwrap_or_else(|| root.clone());
    let base = match in_chain(
        &d.graph,
        &top,
        a.opt_str("base-node"),
        a.opt_str("base"),
        "base",
    )? {
        Some(b) => b,
        None => d
            .graph
            .backing_chain(&top)
            .last()
            .cloned()
            .unwrap_or_else(|| top.clone()),
    };
    if Arc::ptr_eq(&top, &base) {
        return Err(QmpError::generic("cannot commit an image into itself"));
    }
    let job = job_options(a, device)?;
    check_id_free(d, &job)?;
    if Arc::ptr_eq(&top, &root) {
        let mj = MirrorJob::start_active_commit(
            &d.jobs,
            &d.graph,
            &top,
            &base,
            MirrorOptions {
                job,
                ..MirrorOptions::default()
            },
        )
        .map_err(jerr)?;
        log_at!(
            Info,
            "active commit job '{}' started ('{}' into '{}')",
            mj.job().id().unwrap_or(""),
            top.name(),
            base.name()
        );
        return Ok(json!({}));
    }
    let cj = CommitJob::start(
        &d.jobs,
        &d.graph,
        &top,
        &base,
        CommitOptions {
            backing_file: a.opt_str("backing-file").map(str::to_string),
            job,
        },
    )
    .map_err(jerr)?;
    log_at!(
        Info,
        "commit job '{}' started ('{}' into '{}')",
        cj.job().id().unwrap_or(""),
        top.name(),
        base.name()
    );
    Ok(json!({}))
}

/// `block-stream`: copy what the backing chain above `base` holds into the
/// device, then make `base` its backing (none without a base).
pub(crate) fn block_stream(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    refuse(a, &["bottom", "filter-node-name"])?;
    if a.has("base") && a.has("base-node") {
        return Err(QmpError::generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    let device = a.str("device")?;
    let top = lookup_device(d, device)?;
    let base = in_chain(
        &d.graph,
        &top,
        a.opt_str("base-node"),
        a.opt_str("base"),
        "base",
    )?;
    if let Some(b) = &base {
        if Arc::ptr_eq(b, &top) {
            return Err(QmpError::generic("base and device are the same node"));
        }
    }
    // QEMU checks the blockers first.
    top.check_op(BlockOp::Stream).map_err(generic)?;
    if top.is_read_only() {
        return Err(QmpError::generic(format!(
            "Block node '{}' is read-only",
            top.name()
        )));
    }
    let job = job_options(a, device)?;
    check_id_free(d, &job)?;
    let sj = StreamJob::start(
        &d.jobs,
        &d.graph,
        &top,
        base.as_ref(),
        CommitOptions {
            backing_file: a.opt_str("backing-file").map(str::to_string),
            job,
        },
    )
    .map_err(jerr)?;
    log_at!(Info, "stream job '{}' started", sj.job().id().unwrap_or(""));
    Ok(json!({}))
}

fn info_json(i: &JobInfo) -> Value {
    let mut v = json!({
        "type": i.job_type.as_str(),
        "device": i.id.clone().unwrap_or_default(),
        "len": i.len,
        "offset": i.offset,
        "busy": !i.paused && matches!(i.status.as_str(), "running"),
        "paused": i.paused,
        "speed": i.speed,
        "io-status": "ok",
        "ready": i.ready,
        "status": i.status.as_str(),
        "auto-finalize": true,
        "auto-dismiss": true,
    });
    if let Some(e) = &i.error {
        v["error"] = json!(e);
    }
    v
}

fn event_info(i: &JobInfo) -> Value {
    json!({
        "type": i.job_type.as_str(),
        "device": i.id.clone().unwrap_or_default(),
        "len": i.len,
        "offset": i.offset,
        "speed": i.speed,
    })
}

/// `query-block-jobs`.
pub(crate) fn query_block_jobs(d: &Daemon) -> Result<Value, QmpError> {
    let mut list = Vec::new();
    for j in d.jobs.all() {
        if j.is_internal() {
            continue;
        }
        list.push(info_json(&j.info()));
    }
    Ok(Value::Array(list))
}

fn find_block_job(d: &Daemon, id: &str) -> Result<block_jobs::Job, QmpError> {
    d.jobs.find(id).map_err(|_| {
        QmpError::new(
            qmp::ErrorClass::DeviceNotActive,
            format!("Block job '{id}' not found"),
        )
    })
}

/// `block-job-cancel`.
pub(crate) fn block_job_cancel(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let j = find_block_job(d, a.str("device")?)?;
    j.cancel(a.opt_bool("force").unwrap_or(false))
        .map_err(jerr)?;
    Ok(json!({}))
}

/// The single-verb job commands.
pub(crate) enum Verb {
    Pause,
    Resume,
    Complete,
}

/// `block-job-pause`, `block-job-resume`, `block-job-complete`.
pub(crate) fn block_job_verb(d: &Daemon, a: &Args, v: Verb) -> Result<Value, QmpError> {
    let j = find_block_job(d, a.str("device")?)?;
    match v {
        Verb::Pause => j.pause(),
        Verb::Resume => j.resume(),
        Verb::Complete => j.complete(),
    }
    .map_err(jerr)?;
    Ok(json!({}))
}

/// `block-job-set-speed`.
pub(crate) fn block_job_set_speed(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let j = find_block_job(d, a.str("device")?)?;
    let speed = a.i64("speed")?;
    if speed < 0 {
        return Err(QmpError::generic(
            "Parameter 'speed' expects a non-negative value",
        ));
    }
    j.set_speed(speed as u64).map_err(jerr)?;
    Ok(json!({}))
}

/// `job-dismiss`.
pub(crate) fn job_dismiss(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let j = d
        .jobs
        .find(a.str("id")?)
        .map_err(|_| QmpError::generic("Job not found"))?;
    j.dismiss().map_err(jerr)?;
    Ok(json!({}))
}

/// Forwards the job manager's events to QMP clients, in QEMU's shapes.
pub(crate) fn forward_events(d: &Arc<Daemon>) {
    let rx = d.jobs.subscribe();
    let events = d.events.clone();
    let _ = std::thread::Builder::new()
        .name("job-events".into())
        .spawn(move || {
            for ev in rx {
                match ev {
                    JobEvent::StatusChange {
                        id: Some(id),
                        status,
                    } => {
                        events.emit(
                            "JOB_STATUS_CHANGE",
                            json!({"id": id, "status": status.as_str()}),
                        );
                    }
                    JobEvent::StatusChange { id: None, .. } => {}
                    JobEvent::Ready(i) => events.emit("BLOCK_JOB_READY", event_info(&i)),
                    JobEvent::Completed { info, error } => {
                        let mut v = event_info(&info);
                        if let Some(e) = error {
                            log_at!(
                                Warn,
                                "job '{}' failed: {e}",
                                info.id.clone().unwrap_or_default()
                            );
                            v["error"] = json!(e);
                        } else {
                            log_at!(
                                Info,
                                "job '{}' completed",
                                info.id.clone().unwrap_or_default()
                            );
                        }
                        events.emit("BLOCK_JOB_COMPLETED", v);
                    }
                    JobEvent::Cancelled(i) => {
                        log_at!(Info, "job '{}' cancelled", i.id.clone().unwrap_or_default());
                        events.emit("BLOCK_JOB_CANCELLED", event_info(&i))
                    }
                    JobEvent::Error {
                        id,
                        operation,
                        action,
                    } => events.emit(
                        "BLOCK_JOB_ERROR",
                        json!({"device": id.unwrap_or_default(),
                               "operation": operation.as_str(),
                               "action": action.as_str()}),
                    ),
                }
            }
        });
}
