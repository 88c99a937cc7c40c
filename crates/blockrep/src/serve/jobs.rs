//! Block job commands (`blockdev-backup`, `block-commit`, `blockdev-mirror`,
//! `block-stream`, `query-block-jobs`, `block-job-*`), QEMU's generic job
//! commands (`query-jobs`, `job-pause`/`-resume`/`-cancel`/`-complete`/
//! `-finalize`/`-dismiss`) and the forwarding of job events as QEMU's QMP
//! events. The jobs themselves are `block-jobs`' (backup, mirror, active and
//! plain commit, stream).
//!
//! Our jobs always finalize themselves (`auto-finalize: false` is refused),
//! so `pending` is a transient state: `job-finalize` is accepted only there,
//! as QEMU's verb table says, and does nothing more than let the job go on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use block_graph::{BlockOp, Graph, NodeRef};
use block_jobs::{
    BackupJob, BackupOptions, BackupSync, CommitJob, CommitOptions, Job, JobError, JobEvent,
    JobInfo, JobOptions, JobOutcome, JobStatus, JobType, MirrorJob, MirrorOptions, MirrorSync,
    OnError, StreamJob,
};
use parking_lot::Mutex;
use qmp::{Args, QmpError};
use serde_json::{json, Value};

use super::block::lookup_device;
use super::log::log_at;
use super::Daemon;

/// What the daemon keeps of a user job: its handle (for the outcome's errno
/// once the job left the manager) and `auto-dismiss` (block-jobs' `JobInfo`
/// does not carry it).
pub(crate) struct JobMeta {
    job: Job,
    auto_dismiss: bool,
}

/// User jobs by id, shared with the event forwarder.
#[derive(Clone, Default)]
pub(crate) struct MetaMap(Arc<Mutex<HashMap<String, JobMeta>>>);

impl MetaMap {
    fn insert(&self, job: &Job, auto_dismiss: bool) {
        let Some(id) = job.id() else { return };
        let mut m = self.0.lock();
        // Entries of jobs that are gone (dismissed) are dropped here.
        m.retain(|_, v| v.job.status() != JobStatus::Null);
        m.insert(
            id.to_string(),
            JobMeta {
                job: job.clone(),
                auto_dismiss,
            },
        );
    }

    fn auto_dismiss(&self, id: &str) -> bool {
        self.0
            .lock()
            .get(id)
            .map(|m| m.auto_dismiss)
            .unwrap_or(true)
    }

    fn job(&self, id: &str) -> Option<Job> {
        self.0.lock().get(id).map(|m| m.job.clone())
    }
}

/// The text of an errno as C's `strerror` (QEMU reports a job's I/O error
/// this way in `BLOCK_JOB_COMPLETED`, `query-jobs` and `query-block-jobs`).
fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno.abs()).to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// QEMU's error text for a failed job: `strerror` of its errno when it
/// has one, else our message.
fn job_error_text(job: Option<&Job>, fallback: &str) -> String {
    if let Some(JobOutcome::Failed(e)) = job.and_then(Job::outcome) {
        if let Some(errno) = e.errno() {
            return strerror(errno);
        }
    }
    fallback.to_string()
}

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
    let auto_dismiss = job.auto_dismiss;
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
    d.job_meta.insert(bj.job(), auto_dismiss);
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
    let auto_dismiss = job.auto_dismiss;
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
    d.job_meta.insert(mj.job(), auto_dismiss);
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
    block_jobs::check_op_free(&root, BlockOp::CommitSource).map_err(jerr)?;
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
    let auto_dismiss = job.auto_dismiss;
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
        d.job_meta.insert(mj.job(), auto_dismiss);
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
    d.job_meta.insert(cj.job(), auto_dismiss);
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
    block_jobs::check_op_free(&top, BlockOp::Stream).map_err(jerr)?;
    if top.is_read_only() {
        return Err(QmpError::generic(format!(
            "Block node '{}' is read-only",
            top.name()
        )));
    }
    let job = job_options(a, device)?;
    check_id_free(d, &job)?;
    let auto_dismiss = job.auto_dismiss;
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
    d.job_meta.insert(sj.job(), auto_dismiss);
    log_at!(Info, "stream job '{}' started", sj.job().id().unwrap_or(""));
    Ok(json!({}))
}

fn info_json(d: &Daemon, j: &Job) -> Value {
    let i = j.info();
    let id = i.id.clone().unwrap_or_default();
    let mut v = json!({
        "type": i.job_type.as_str(),
        "device": id,
        "len": i.len,
        "offset": i.offset,
        "busy": !i.paused && matches!(i.status.as_str(), "running"),
        "paused": i.paused,
        "speed": i.speed,
        "io-status": "ok",
        "ready": i.ready,
        "status": i.status.as_str(),
        "auto-finalize": true,
        "auto-dismiss": d.job_meta.auto_dismiss(&id),
    });
    // QEMU 8.2+: BlockJobInfo is a union on `type`; mirror jobs add
    // `actively-synced` (only write-blocking mode, which we refuse, sets it).
    if i.job_type == JobType::Mirror {
        v["actively-synced"] = json!(false);
    }
    if let Some(e) = &i.error {
        v["error"] = json!(job_error_text(Some(j), e));
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

fn user_jobs(d: &Daemon) -> Vec<Job> {
    d.jobs
        .all()
        .into_iter()
        .filter(|j| !j.is_internal())
        .collect()
}

/// `query-block-jobs`.
pub(crate) fn query_block_jobs(d: &Daemon) -> Result<Value, QmpError> {
    Ok(Value::Array(
        user_jobs(d).iter().map(|j| info_json(d, j)).collect(),
    ))
}

/// `query-jobs`: QEMU's `JobInfo` (`id`, `type`, `status`,
/// `current-progress`, `total-progress`, `error` once failed).
pub(crate) fn query_jobs(d: &Daemon) -> Result<Value, QmpError> {
    let mut list = Vec::new();
    for j in user_jobs(d) {
        let i = j.info();
        let mut v = json!({
            "id": i.id.clone().unwrap_or_default(),
            "type": i.job_type.as_str(),
            "status": i.status.as_str(),
            "current-progress": i.offset,
            "total-progress": i.len,
        });
        if let Some(e) = &i.error {
            v["error"] = json!(job_error_text(Some(&j), e));
        }
        list.push(v);
    }
    Ok(Value::Array(list))
}

fn find_block_job(d: &Daemon, id: &str) -> Result<Job, QmpError> {
    d.jobs.find(id).map_err(|_| {
        QmpError::new(
            qmp::ErrorClass::DeviceNotActive,
            format!("Block job '{id}' not found"),
        )
    })
}

/// QEMU's `find_job_locked`: GenericError "Job not found".
fn find_job(d: &Daemon, id: &str) -> Result<Job, QmpError> {
    d.jobs
        .find(id)
        .map_err(|_| QmpError::generic("Job not found"))
}

/// `block-job-cancel`: as QEMU, a paused job is only cancelled with
/// `force` ("The block job for device 'x' is currently paused").
pub(crate) fn block_job_cancel(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let device = a.str("device")?;
    let j = find_block_job(d, device)?;
    let force = a.opt_bool("force").unwrap_or(false);
    let i = j.info();
    if !force && i.paused && matches!(i.status, JobStatus::Paused | JobStatus::Standby) {
        return Err(QmpError::generic(format!(
            "The block job for device '{device}' is currently paused"
        )));
    }
    j.cancel(force).map_err(jerr)?;
    Ok(json!({}))
}

/// The single-verb job commands.
pub(crate) enum Verb {
    Pause,
    Resume,
    Complete,
    /// `job-cancel` (always a forced cancel, as QEMU's).
    Cancel,
    Finalize,
}

/// QEMU's `job_apply_verb` error.
fn verb_error(j: &Job, status: JobStatus, verb: &str) -> QmpError {
    QmpError::generic(format!(
        "Job '{}' in state '{}' cannot accept command verb '{verb}'",
        j.id().unwrap_or(""),
        status.as_str()
    ))
}

/// Applies a verb with QEMU's checks and error texts (block-jobs' own
/// texts differ in wording for pause/resume; its verb table is QEMU's
/// since 6.2, complete accepted in `ready` and `standby`).
fn apply_verb(j: &Job, v: Verb) -> Result<(), QmpError> {
    let status = j.status();
    let r = match v {
        Verb::Pause => j.pause(),
        Verb::Resume => j.resume(),
        Verb::Cancel => j.cancel(true),
        Verb::Complete => j.complete(),
        Verb::Finalize => {
            // Jobs finalize themselves; a job seen in `pending` is doing so.
            if status != JobStatus::Pending {
                return Err(verb_error(j, status, "finalize"));
            }
            Ok(())
        }
    };
    r.map_err(|e| {
        let msg = e.context().to_string();
        if msg.contains("already paused") {
            QmpError::generic("Job is already paused")
        } else if msg.contains("was not paused") {
            QmpError::generic("Can't resume a job that was not paused")
        } else if msg.contains("being cancelled") {
            QmpError::generic(format!(
                "The active block job '{}' cannot be completed",
                j.id().unwrap_or("")
            ))
        } else {
            QmpError::generic(msg)
        }
    })
}

/// `block-job-pause`, `block-job-resume`, `block-job-complete`.
pub(crate) fn block_job_verb(d: &Daemon, a: &Args, v: Verb) -> Result<Value, QmpError> {
    let j = find_block_job(d, a.str("device")?)?;
    apply_verb(&j, v)?;
    Ok(json!({}))
}

/// `job-pause`, `job-resume`, `job-cancel`, `job-complete`, `job-finalize`.
pub(crate) fn job_verb(d: &Daemon, a: &Args, v: Verb) -> Result<Value, QmpError> {
    let j = find_job(d, a.str("id")?)?;
    apply_verb(&j, v)?;
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
    let j = find_job(d, a.str("id")?)?;
    j.dismiss().map_err(jerr)?;
    Ok(json!({}))
}

/// The job whose failure `msg` the forwarder is reporting, with its
/// outcome set. A job can fail before its starting command registered it,
/// and the outcome is set just after the event: both are waited for
/// briefly. The error message identifies the job (not an older one that
/// had the same id).
fn failed_job(meta: &MetaMap, id: &str, msg: &str) -> Option<Job> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(j) = meta.job(id) {
            if j.info().error.as_deref() == Some(msg) {
                let _ = j.wait_timeout(Duration::from_secs(2));
                return Some(j);
            }
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Forwards the job manager's events to QMP clients, in QEMU's shapes:
/// `JOB_STATUS_CHANGE {id, status}`, `BLOCK_JOB_READY`/`_CANCELLED`
/// `{type, device, len, offset, speed}`, `BLOCK_JOB_COMPLETED` (the same
/// and `error` on failure), `BLOCK_JOB_ERROR {device, operation, action}`.
pub(crate) fn forward_events(d: &Arc<Daemon>) {
    let rx = d.jobs.subscribe();
    let events = d.events.clone();
    let meta = d.job_meta.clone();
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
                        let id = info.id.clone().unwrap_or_default();
                        let mut v = event_info(&info);
                        if let Some(e) = error {
                            log_at!(Warn, "job '{id}' failed: {e}");
                            let job = failed_job(&meta, &id, &e);
                            v["error"] = json!(job_error_text(job.as_ref(), &e));
                        } else {
                            log_at!(Info, "job '{id}' completed");
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
