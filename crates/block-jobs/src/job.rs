//! The job framework: states, verbs, the job thread, pause points, speed limit,
//! error policies, events and the registry.
//!
//! State names and the allowed transitions and verbs follow QEMU's `job.c`
//! (`JobStatus`, `JobVerb`), so the daemon can report them over QMP unchanged.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use block_graph::{DrainListener, DrainListenerGuard, Graph, NodeRef};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::error::{ErrorKind, JobError, Result};
use crate::ratelimit::RateLimit;

/// The kind of job (QEMU's `JobType` words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobType {
    /// `blockdev-backup` / replication's sync=none backup.
    Backup,
    /// `blockdev-mirror`.
    Mirror,
    /// `block-commit` (plain or active).
    Commit,
    /// `block-stream`.
    Stream,
}

impl JobType {
    /// QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Backup => "backup",
            JobType::Mirror => "mirror",
            JobType::Commit => "commit",
            JobType::Stream => "stream",
        }
    }
}

impl fmt::Display for JobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Job status, QEMU's `JobStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Never seen by users.
    Undefined,
    /// Created, thread not yet running.
    Created,
    /// Working.
    Running,
    /// Paused (by user, by an error with policy stop, or by a drained section).
    Paused,
    /// Converged, waiting for `complete` (mirror, active commit).
    Ready,
    /// Paused while ready.
    Standby,
    /// Finished work, waiting for its transaction (always passes through here).
    Waiting,
    /// About to finalize (pivot, graph changes).
    Pending,
    /// Failing or cancelled, rolling back.
    Aborting,
    /// Finished; result readable until dismissed.
    Concluded,
    /// Dismissed; gone from the registry.
    Null,
}

impl JobStatus {
    /// QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn idx(self) -> usize {
        self as usize
    }

    /// QEMU's transition table: may a job go from `self` to `to`?
    pub fn can_transition(self, to: JobStatus) -> bool {
        use JobStatus::*;
        const T: [[u8; 11]; 11] = [
            //U  C  R  P  Y  S  W  D  X  E  N
            [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], // U
            [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1], // C
            [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0], // R
            [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], // P
            [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0], // Y
            [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], // S
            [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], // W
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // D
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // X
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], // E
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // N
        ];
        let _ = (Undefined, Null);
        T[self.idx()][to.idx()] == 1
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user command on a job (QEMU's `JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobVerb {
    /// `job-cancel` / `block-job-cancel`.
    Cancel,
    /// `job-pause`.
    Pause,
    /// `job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `job-complete`.
    Complete,
    /// `job-dismiss`.
    Dismiss,
}

impl JobVerb {
    /// QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Dismiss => "dismiss",
        }
    }

    /// QEMU's verb table: is this verb accepted in `status`?
    pub fn allowed_in(self, status: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            JobVerb::Cancel => matches!(
                status,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => matches!(status, Ready | Standby),
            JobVerb::Dismiss => status == Concluded,
        }
    }
}

/// What to do on an I/O error (QEMU's `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the job (default).
    #[default]
    Report,
    /// Ignore the error and retry/continue.
    Ignore,
    /// Pause the job on ENOSPC, report anything else.
    Enospc,
    /// Pause the job; the user resumes it to retry.
    Stop,
}

impl OnError {
    /// QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Enospc => "enospc",
            OnError::Stop => "stop",
        }
    }

    /// Parse QMP's spelling; "auto" means report for block jobs.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "report" | "auto" => OnError::Report,
            "ignore" => OnError::Ignore,
            "enospc" => OnError::Enospc,
            "stop" => OnError::Stop,
            other => {
                return Err(JobError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "on-error '{other}': allowed values are report, ignore, enospc, stop, auto"
                    ),
                ))
            }
        })
    }
}

/// Which side of a copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOperation {
    /// Reading the source.
    Read,
    /// Writing the target.
    Write,
}

impl IoOperation {
    /// QMP spelling (`BLOCK_JOB_ERROR.operation`).
    pub fn as_str(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// The action taken for an I/O error (QEMU's `BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// The error ends the job.
    Report,
    /// The error was ignored; the job goes on (and retries the chunk).
    Ignore,
    /// The job paused itself; `resume` retries.
    Stop,
}

impl ErrorAction {
    /// QMP spelling (`BLOCK_JOB_ERROR.action`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// A snapshot of a job, shaped like QMP's `BlockJobInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// Job id (`device` in block-job QMP events); `None` for internal jobs.
    pub id: Option<String>,
    /// Job type.
    pub job_type: JobType,
    /// Status.
    pub status: JobStatus,
    /// Bytes done so far.
    pub offset: u64,
    /// Bytes to do (may grow while the job runs).
    pub len: u64,
    /// Speed limit in bytes/s, 0 = none.
    pub speed: u64,
    /// The job is paused (by anyone).
    pub paused: bool,
    /// The job reached ready.
    pub ready: bool,
    /// Error message of a failed job.
    pub error: Option<String>,
}

/// Events of jobs, shaped to become QMP events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// `JOB_STATUS_CHANGE {id, status}`.
    StatusChange {
        /// Job id (None for internal jobs, which the manager does not publish).
        id: Option<String>,
        /// New status.
        status: JobStatus,
    },
    /// `BLOCK_JOB_READY {type, device, len, offset, speed}`.
    Ready(JobInfo),
    /// `BLOCK_JOB_COMPLETED {type, device, len, offset, speed, error?}`.
    Completed {
        /// State at completion.
        info: JobInfo,
        /// Error message if the job failed.
        error: Option<String>,
    },
    /// `BLOCK_JOB_CANCELLED {type, device, len, offset, speed}`.
    Cancelled(JobInfo),
    /// `BLOCK_JOB_ERROR {device, operation, action}`.
    Error {
        /// Job id.
        id: Option<String>,
        /// Read (source) or write (target).
        operation: IoOperation,
        /// Action taken.
        action: ErrorAction,
    },
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    /// Finished successfully (for mirror: also a soft cancel after ready).
    Completed,
    /// Cancelled.
    Cancelled,
    /// Failed with this error.
    Failed(Arc<JobError>),
}

impl JobOutcome {
    /// True for `Completed`.
    pub fn is_ok(&self) -> bool {
        matches!(self, JobOutcome::Completed)
    }

    /// Turn into a `Result` (cancelled becomes an error of kind `Cancelled`).
    pub fn into_result(self) -> Result<()> {
        match self {
            JobOutcome::Completed => Ok(()),
            JobOutcome::Cancelled => Err(JobError::cancelled()),
            JobOutcome::Failed(e) => {
                Err(JobError::new(e.kind(), e.full_message()).with_errno(e.errno()))
            }
        }
    }
}

/// Options common to every job.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Job id; `None` makes an internal job, hidden from listings and events.
    pub id: Option<String>,
    /// Speed limit in bytes/s, 0 = unlimited.
    pub speed: u64,
    /// Dismiss automatically once concluded (QEMU's default).
    pub auto_dismiss: bool,
    /// Policy for errors reading the source.
    pub on_source_error: OnError,
    /// Policy for errors writing the target.
    pub on_target_error: OnError,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            id: None,
            speed: 0,
            auto_dismiss: true,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
        }
    }
}

impl JobOptions {
    /// Options for a user-visible job with this id.
    pub fn with_id(id: impl Into<String>) -> Self {
        JobOptions {
            id: Some(id.into()),
            ..Default::default()
        }
    }
}

/// The work of one job kind, run on the job's own thread.
pub trait JobDriver: Send + 'static {
    /// The job type reported to users.
    fn job_type(&self) -> JobType;
    /// The main loop. Return when done, cancelled (check
    /// [`JobContext::is_cancelled`]) or failed. Call [`JobContext::pause_point`]
    /// between units of work.
    fn run(&mut self, ctx: &JobContext) -> Result<()>;
    /// After a successful run (not cancelled): make the result visible (pivot,
    /// graph changes). An error here aborts the job.
    fn prepare(&mut self, _ctx: &JobContext) -> Result<()> {
        Ok(())
    }
    /// After a failed or cancelled run (or failed prepare): roll back.
    fn abort(&mut self, _ctx: &JobContext) {}
    /// Always last: release what the job holds (filters, blockers).
    fn clean(&mut self, _ctx: &JobContext) {}
    /// The graph and the nodes the job reads or writes: drained sections
    /// covering any of them pause the job (see [`DRAIN_PARK_TIMEOUT`]).
    /// None: drains do not pause it.
    ///
    /// A driver that returns nodes must not reach a pause point (including
    /// [`JobContext::throttle`] and [`JobContext::sleep`]) while it holds
    /// anything a request on those nodes may wait for (a copy-before-write
    /// cluster claim, a serialising guard) or while its own requests are in
    /// flight: parked there inside a drained section, it would keep the
    /// section waiting for a request that waits for the job. Throttle first,
    /// then take (see [`JobContext::account`]).
    fn drained_nodes(&self) -> Option<(Graph, Vec<NodeRef>)> {
        None
    }
}

/// How long a drained section begun by another thread waits for a job using
/// its nodes to park at its next pause point (status `paused`, or `standby`
/// when ready) before it goes on regardless. The section is safe either way:
/// the nodes' own drain holds any later request of the job; the bound only
/// keeps a job that cannot reach a pause point (it waits for the draining
/// thread) from stalling the section for ever.
pub const DRAIN_PARK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct State {
    status: JobStatus,
    pause_count: u32,
    user_paused: bool,
    parked: bool,
    cancel_requested: bool,
    force_cancel: bool,
    complete_requested: bool,
    ready: bool,
    kicked: bool,
    speed: u64,
    speed_changed: bool,
    outcome: Option<JobOutcome>,
    error_msg: Option<String>,
    /// The job thread, once started (its own drained sections do not pause it).
    thread: Option<ThreadId>,
    /// The driver's `run` has not returned yet (it still has pause points).
    in_run: bool,
    /// Owners of the drained sections that paused the job (one entry each).
    drain_pauses: Vec<ThreadId>,
}

struct JobInner {
    id: Option<String>,
    job_type: JobType,
    opts: JobOptions,
    state: Mutex<State>,
    cond: Condvar,
    offset: AtomicU64,
    len: AtomicU64,
    subscribers: Mutex<Vec<Sender<JobEvent>>>,
    manager: Weak<ManagerInner>,
    /// Keeps the drain listener registered while the job runs.
    drain_watch: Mutex<Option<DrainListenerGuard>>,
}

/// A handle on a job; cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Job {
    inner: Arc<JobInner>,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.inner.id)
            .field("type", &self.inner.job_type)
            .field("status", &self.status())
            .finish()
    }
}

impl Job {
    /// The job id (`None` for internal jobs).
    pub fn id(&self) -> Option<&str> {
        self.inner.id.as_deref()
    }

    fn name(&self) -> String {
        match &self.inner.id {
            Some(id) => format!("Job '{id}'"),
            None => format!("internal {} job", self.inner.job_type),
        }
    }

    /// The job type.
    pub fn job_type(&self) -> JobType {
        self.inner.job_type
    }

    /// True for internal jobs (no id).
    pub fn is_internal(&self) -> bool {
        self.inner.id.is_none()
    }

    /// Current status.
    pub fn status(&self) -> JobStatus {
        self.inner.state.lock().status
    }

    /// Progress `(offset, len)` in bytes; readable at any time.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.inner.offset.load(Ordering::Relaxed),
            self.inner.len.load(Ordering::Relaxed),
        )
    }

    /// A QMP-shaped snapshot.
    pub fn info(&self) -> JobInfo {
        let st = self.inner.state.lock();
        self.info_locked(&st)
    }

    fn info_locked(&self, st: &State) -> JobInfo {
        let (offset, len) = self.progress();
        JobInfo {
            id: self.inner.id.clone(),
            job_type: self.inner.job_type,
            status: st.status,
            offset,
            len,
            speed: st.speed,
            paused: st.pause_count > 0,
            ready: st.ready,
            error: st.error_msg.clone(),
        }
    }

    /// A channel receiving every event of this job (internal jobs too).
    pub fn subscribe(&self) -> Receiver<JobEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.inner.subscribers.lock().push(tx);
        rx
    }

    fn check_verb(&self, st: &State, verb: JobVerb) -> Result<()> {
        if verb.allowed_in(st.status) {
            Ok(())
        } else {
            Err(JobError::new(
                ErrorKind::InvalidState,
                format!(
                    "{} in state '{}' cannot accept command verb '{}'",
                    self.name(),
                    st.status,
                    verb.as_str()
                ),
            ))
        }
    }

    /// User pause (`job-pause`): the job parks at its next pause point.
    pub fn pause(&self) -> Result<()> {
        let mut st = self.inner.state.lock();
        self.check_verb(&st, JobVerb::Pause)?;
        if st.user_paused {
            return Err(JobError::new(
                ErrorKind::InvalidState,
                format!("{} is already paused", self.name()),
            ));
        }
        st.user_paused = true;
        st.pause_count += 1;
        self.inner.cond.notify_all();
        Ok(())
    }

    /// User resume (`job-resume`).
    pub fn resume(&self) -> Result<()> {
        let mut st = self.inner.state.lock();
        self.check_verb(&st, JobVerb::Resume)?;
        if !st.user_paused {
            return Err(JobError::new(
                ErrorKind::InvalidState,
                format!("Can't resume {}: it was not paused", self.name()),
            ));
        }
        st.user_paused = false;
        st.pause_count -= 1;
        self.inner.cond.notify_all();
        Ok(())
    }

    /// Pause on behalf of the graph (drained section); counts, nests.
    pub fn pause_internal(&self) {
        let mut st = self.inner.state.lock();
        st.pause_count += 1;
        self.inner.cond.notify_all();
    }

    /// End a [`Job::pause_internal`].
    pub fn resume_internal(&self) {
        let mut st = self.inner.state.lock();
        st.pause_count = st.pause_count.saturating_sub(1);
        self.inner.cond.notify_all();
    }

    /// Wait until the job has parked at a pause point (or ended). Returns false on timeout.
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state.lock();
        loop {
            if st.parked || st.outcome.is_some() {
                return true;
            }
            if self.inner.cond.wait_until(&mut st, deadline).timed_out() {
                return st.parked || st.outcome.is_some();
            }
        }
    }

    /// Cancel (`job-cancel`). With `force=false` a ready mirror completes
    /// without pivoting (target stays in sync, source stays in use), as QEMU does.
    pub fn cancel(&self, force: bool) -> Result<()> {
        let mut st = self.inner.state.lock();
        if matches!(
            st.status,
            JobStatus::Concluded | JobStatus::Null | JobStatus::Aborting
        ) {
            // QEMU accepts nothing here; a cancel racing with the end is harmless.
            return self.check_verb(&st, JobVerb::Cancel);
        }
        self.check_verb(&st, JobVerb::Cancel)?;
        st.cancel_requested = true;
        if force || !st.ready {
            st.force_cancel = true;
        }
        self.inner.cond.notify_all();
        Ok(())
    }

    /// Complete (`job-complete`): only in ready.
    pub fn complete(&self) -> Result<()> {
        let mut st = self.inner.state.lock();
        self.check_verb(&st, JobVerb::Complete)?;
        if st.cancel_requested {
            return Err(JobError::new(
                ErrorKind::InvalidState,
                format!("{} is being cancelled", self.name()),
            ));
        }
        st.complete_requested = true;
        self.inner.cond.notify_all();
        Ok(())
    }

    /// Change the speed limit (`block-job-set-speed`), bytes/s, 0 = unlimited.
    pub fn set_speed(&self, speed: u64) -> Result<()> {
        let mut st = self.inner.state.lock();
        self.check_verb(&st, JobVerb::SetSpeed)?;
        st.speed = speed;
        st.speed_changed = true;
        self.inner.cond.notify_all();
        Ok(())
    }

    /// Dismiss a concluded job (`job-dismiss`).
    pub fn dismiss(&self) -> Result<()> {
        let mut st = self.inner.state.lock();
        self.check_verb(&st, JobVerb::Dismiss)?;
        self.transition_locked(&mut st, JobStatus::Null);
        drop(st);
        if let Some(m) = self.inner.manager.upgrade() {
            m.remove(self);
        }
        Ok(())
    }

    /// Wake the job if it sleeps waiting for work (new dirty data, for example).
    pub fn kick(&self) {
        let mut st = self.inner.state.lock();
        st.kicked = true;
        self.inner.cond.notify_all();
    }

    /// Block until the job concluded; returns how it ended.
    pub fn wait(&self) -> JobOutcome {
        let mut st = self.inner.state.lock();
        loop {
            if let Some(o) = &st.outcome {
                return o.clone();
            }
            self.inner.cond.wait(&mut st);
        }
    }

    /// Like [`Job::wait`] with a timeout; `None` if still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<JobOutcome> {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state.lock();
        loop {
            if let Some(o) = &st.outcome {
                return Some(o.clone());
            }
            if self.inner.cond.wait_until(&mut st, deadline).timed_out() {
                return st.outcome.clone();
            }
        }
    }

    /// Block until the job is ready (true) or concluded (false).
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state.lock();
        loop {
            if st.ready {
                return true;
            }
            if st.outcome.is_some() {
                return false;
            }
            if self.inner.cond.wait_until(&mut st, deadline).timed_out() {
                return st.ready;
            }
        }
    }

    /// The outcome, once concluded.
    pub fn outcome(&self) -> Option<JobOutcome> {
        self.inner.state.lock().outcome.clone()
    }

    fn emit(&self, ev: JobEvent) {
        self.inner
            .subscribers
            .lock()
            .retain(|s| s.send(ev.clone()).is_ok());
        if self.inner.id.is_some() {
            if let Some(m) = self.inner.manager.upgrade() {
                m.emit(ev);
            }
        }
    }

    fn transition_locked(&self, st: &mut State, to: JobStatus) {
        debug_assert!(
            st.status.can_transition(to),
            "illegal job transition {} -> {}",
            st.status,
            to
        );
        st.status = to;
        self.emit(JobEvent::StatusChange {
            id: self.inner.id.clone(),
            status: to,
        });
        self.inner.cond.notify_all();
    }
}

/// What the job thread sees of its job: pause points, progress, speed, errors.
pub struct JobContext {
    job: Job,
    limit: Mutex<RateLimit>,
}

impl JobContext {
    /// The job handle.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Policy for source (read) errors.
    pub fn on_source_error(&self) -> OnError {
        self.job.inner.opts.on_source_error
    }

    /// Policy for target (write) errors.
    pub fn on_target_error(&self) -> OnError {
        self.job.inner.opts.on_target_error
    }

    /// Hard cancel: the job must stop and roll back.
    pub fn is_cancelled(&self) -> bool {
        self.job.inner.state.lock().force_cancel
    }

    /// Any cancel, including a soft cancel of a ready mirror.
    pub fn cancel_requested(&self) -> bool {
        self.job.inner.state.lock().cancel_requested
    }

    /// `complete` was requested.
    pub fn should_complete(&self) -> bool {
        self.job.inner.state.lock().complete_requested
    }

    /// Park here while the job is paused. Returns early on any cancel.
    pub fn pause_point(&self) {
        let inner = &self.job.inner;
        let mut st = inner.state.lock();
        if st.pause_count == 0 || st.cancel_requested {
            return;
        }
        let prev = st.status;
        let parked_status = if prev == JobStatus::Ready {
            JobStatus::Standby
        } else {
            JobStatus::Paused
        };
        if prev.can_transition(parked_status) {
            self.job.transition_locked(&mut st, parked_status);
        }
        // time spent parked is not lateness for the speed limit
        self.limit.lock().mark_idle();
        st.parked = true;
        inner.cond.notify_all();
        while st.pause_count > 0 && !st.cancel_requested {
            inner.cond.wait(&mut st);
        }
        st.parked = false;
        if st.status != prev && st.status.can_transition(prev) {
            self.job.transition_locked(&mut st, prev);
        }
    }

    /// A pause (user, error policy or drained section) waits for the next
    /// pause point; a job with requests in flight finishes them first.
    pub fn pause_requested(&self) -> bool {
        let st = self.job.inner.state.lock();
        st.pause_count > 0 && !st.cancel_requested
    }

    /// Whether [`JobContext::throttle`] would sleep now (the speed limit is in
    /// debt); a job with requests in flight finishes them first, so that a
    /// pause arriving during the sleep finds nothing in flight.
    pub fn throttle_would_wait(&self) -> bool {
        {
            let mut st = self.job.inner.state.lock();
            if st.speed_changed {
                st.speed_changed = false;
                self.limit.lock().set_speed(st.speed);
            }
        }
        !self.limit.lock().delay().is_zero()
    }

    /// Mark the job ready (emits `BLOCK_JOB_READY`); idempotent.
    pub fn set_ready(&self) {
        let mut st = self.job.inner.state.lock();
        if st.ready {
            return;
        }
        st.ready = true;
        if st.status == JobStatus::Running {
            self.job.transition_locked(&mut st, JobStatus::Ready);
        }
        let info = self.job.info_locked(&st);
        self.job.emit(JobEvent::Ready(info));
        self.job.inner.cond.notify_all();
    }

    /// True once ready.
    pub fn is_ready(&self) -> bool {
        self.job.inner.state.lock().ready
    }

    /// The current speed limit in bytes/s (0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.job.inner.state.lock().speed
    }

    /// Set the total length of the work.
    pub fn set_len(&self, len: u64) {
        self.job.inner.len.store(len, Ordering::Relaxed);
    }

    /// Grow the total length (new dirty data).
    pub fn add_len(&self, n: u64) {
        self.job.inner.len.fetch_add(n, Ordering::Relaxed);
    }

    /// Set the bytes done.
    pub fn set_progress(&self, offset: u64) {
        self.job.inner.offset.store(offset, Ordering::Relaxed);
    }

    /// Record `n` bytes done.
    pub fn add_progress(&self, n: u64) {
        self.job.inner.offset.fetch_add(n, Ordering::Relaxed);
    }

    /// Wait, as the speed limit requires, then account `n` bytes as dispatched.
    /// The wait ends early on cancel, pause (then parks) or speed change.
    pub fn throttle(&self, n: u64) {
        loop {
            {
                let mut st = self.job.inner.state.lock();
                if st.speed_changed {
                    st.speed_changed = false;
                    self.limit.lock().set_speed(st.speed);
                }
            }
            let d = self.limit.lock().delay();
            if d.is_zero() {
                break;
            }
            if self.sleep_inner(d, true) {
                if self.cancel_requested() {
                    return;
                }
                self.pause_point();
            }
        }
        self.limit.lock().consume(n);
    }

    /// Account `n` bytes as dispatched for the speed limit without waiting
    /// (never a pause point). For work that must not park between taking a
    /// resource and using it: wait first with `throttle(0)`, take, then
    /// account (a backup's cluster claim, which guest writes may wait for).
    pub fn account(&self, n: u64) {
        {
            let mut st = self.job.inner.state.lock();
            if st.speed_changed {
                st.speed_changed = false;
                self.limit.lock().set_speed(st.speed);
            }
        }
        self.limit.lock().consume(n);
    }

    /// Sleep up to `d`; returns true if woken early by cancel, pause, complete
    /// or kick.
    /// The job is idle by its own choice meanwhile: the speed limit does not
    /// let it catch up the time slept (see [`crate::RateLimit::mark_idle`]).
    pub fn sleep(&self, d: Duration) -> bool {
        self.limit.lock().mark_idle();
        self.sleep_inner(d, false)
    }

    fn sleep_inner(&self, d: Duration, wake_on_speed: bool) -> bool {
        let deadline = Instant::now() + d;
        let inner = &self.job.inner;
        let mut st = inner.state.lock();
        loop {
            if st.cancel_requested
                || st.pause_count > 0
                || st.complete_requested
                || (wake_on_speed && st.speed_changed)
            {
                return true;
            }
            if st.kicked {
                st.kicked = false;
                return true;
            }
            if inner.cond.wait_until(&mut st, deadline).timed_out() {
                return false;
            }
        }
    }

    /// Handle an I/O error by the job's policy: emits `BLOCK_JOB_ERROR` and
    /// returns the action. On `Stop` the job is user-paused and this call parks
    /// until resumed (or cancelled); the caller then retries.
    pub fn io_error(&self, op: IoOperation, err: &JobError) -> ErrorAction {
        let policy = match op {
            IoOperation::Read => self.on_source_error(),
            IoOperation::Write => self.on_target_error(),
        };
        let action = match policy {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc => {
                if err.is_enospc() {
                    ErrorAction::Stop
                } else {
                    ErrorAction::Report
                }
            }
        };
        self.job.emit(JobEvent::Error {
            id: self.job.inner.id.clone(),
            operation: op,
            action,
        });
        if action == ErrorAction::Stop {
            {
                let mut st = self.job.inner.state.lock();
                if !st.user_paused {
                    st.user_paused = true;
                    st.pause_count += 1;
                }
            }
            self.pause_point();
        }
        action
    }
}

/// The registry of jobs: unique ids, listing (internal jobs hidden), events.
#[derive(Clone, Default)]
pub struct JobManager {
    inner: Arc<ManagerInner>,
}

#[derive(Default)]
struct ManagerInner {
    jobs: Mutex<Vec<Job>>,
    subscribers: Mutex<Vec<Sender<JobEvent>>>,
}

impl ManagerInner {
    fn emit(&self, ev: JobEvent) {
        self.subscribers
            .lock()
            .retain(|s| s.send(ev.clone()).is_ok());
    }

    fn remove(&self, job: &Job) {
        self.jobs
            .lock()
            .retain(|j| !Arc::ptr_eq(&j.inner, &job.inner));
    }
}

impl fmt::Debug for JobManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobManager")
            .field("jobs", &*self.inner.jobs.lock())
            .finish()
    }
}

fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl JobManager {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A channel receiving the events of every user-visible job (not internal ones).
    pub fn subscribe(&self) -> Receiver<JobEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.inner.subscribers.lock().push(tx);
        rx
    }

    /// User-visible jobs (internal jobs hidden), QMP `query-block-jobs`.
    pub fn list(&self) -> Vec<JobInfo> {
        self.inner
            .jobs
            .lock()
            .iter()
            .filter(|j| !j.is_internal())
            .map(Job::info)
            .collect()
    }

    /// Every job including internal ones.
    pub fn all(&self) -> Vec<Job> {
        self.inner.jobs.lock().clone()
    }

    /// Find a user job by id.
    pub fn find(&self, id: &str) -> Result<Job> {
        self.inner
            .jobs
            .lock()
            .iter()
            .find(|j| j.id() == Some(id))
            .cloned()
            .ok_or_else(|| JobError::new(ErrorKind::NotFound, format!("Job '{id}' not found")))
    }

    /// Register a job and start its thread.
    /// Drained sections over the driver's [`JobDriver::drained_nodes`]
    /// begun by other threads pause the job at its next pause point (status
    /// `paused`, `standby` when ready, with their events) and resume it when
    /// they end, as QEMU's jobs do; the section waits (bounded by
    /// [`DRAIN_PARK_TIMEOUT`]) until the job parked.
    pub fn start(&self, driver: Box<dyn JobDriver>, opts: JobOptions) -> Result<Job> {
        let job = self.create(driver.job_type(), opts)?;
        if let Some((graph, nodes)) = driver.drained_nodes() {
            let l = Arc::new(DrainPause {
                job: Arc::downgrade(&job.inner),
            });
            *job.inner.drain_watch.lock() = Some(graph.add_drain_listener(&nodes, l));
        }
        spawn(job.clone(), driver)?;
        Ok(job)
    }

    fn create(&self, job_type: JobType, opts: JobOptions) -> Result<Job> {
        let mut jobs = self.inner.jobs.lock();
        if let Some(id) = &opts.id {
            if !valid_id(id) {
                return Err(JobError::new(
                    ErrorKind::InvalidArgument,
                    format!("Invalid job ID '{id}'"),
                ));
            }
            if jobs.iter().any(|j| j.id() == Some(id.as_str())) {
                return Err(JobError::new(
                    ErrorKind::DuplicateId,
                    format!("Job ID '{id}' already in use"),
                ));
            }
        }
        let job = Job {
            inner: Arc::new(JobInner {
                id: opts.id.clone(),
                job_type,
                state: Mutex::new(State {
                    status: JobStatus::Undefined,
                    pause_count: 0,
                    user_paused: false,
                    parked: false,
                    cancel_requested: false,
                    force_cancel: false,
                    complete_requested: false,
                    ready: false,
                    kicked: false,
                    speed: opts.speed,
                    speed_changed: false,
                    outcome: None,
                    error_msg: None,
                    thread: None,
                    in_run: true,
                    drain_pauses: Vec::new(),
                }),
                cond: Condvar::new(),
                offset: AtomicU64::new(0),
                len: AtomicU64::new(0),
                subscribers: Mutex::new(Vec::new()),
                manager: Arc::downgrade(&self.inner),
                drain_watch: Mutex::new(None),
                opts,
            }),
        };
        jobs.push(job.clone());
        drop(jobs);
        let mut st = job.inner.state.lock();
        job.transition_locked(&mut st, JobStatus::Created);
        drop(st);
        Ok(job)
    }
}

/// Pauses a job while drained sections begun by other threads cover its nodes.
struct DrainPause {
    job: Weak<JobInner>,
}

impl DrainListener for DrainPause {
    fn drained_begin(&self, owner: ThreadId) {
        let Some(inner) = self.job.upgrade() else {
            return;
        };
        let mut st = inner.state.lock();
        if st.thread == Some(owner) || st.outcome.is_some() {
            return;
        }
        st.drain_pauses.push(owner);
        st.pause_count += 1;
        inner.cond.notify_all();
    }

    fn drained_wait(&self, owner: ThreadId) {
        let Some(inner) = self.job.upgrade() else {
            return;
        };
        let deadline = Instant::now() + DRAIN_PARK_TIMEOUT;
        let mut st = inner.state.lock();
        if !st.drain_pauses.contains(&owner) {
            return;
        }
        while !(st.parked || !st.in_run || st.outcome.is_some() || st.cancel_requested) {
            if inner.cond.wait_until(&mut st, deadline).timed_out() {
                return;
            }
        }
    }

    fn drained_end(&self, owner: ThreadId) {
        let Some(inner) = self.job.upgrade() else {
            return;
        };
        let mut st = inner.state.lock();
        if let Some(i) = st.drain_pauses.iter().position(|t| *t == owner) {
            st.drain_pauses.swap_remove(i);
            st.pause_count = st.pause_count.saturating_sub(1);
            inner.cond.notify_all();
        }
    }
}

fn spawn(job: Job, driver: Box<dyn JobDriver>) -> Result<()> {
    let name = format!("job-{}", job.id().unwrap_or(job.job_type().as_str()));
    let ctx = JobContext {
        limit: Mutex::new(RateLimit::new(job.inner.opts.speed)),
        job: job.clone(),
    };
    let j2 = job.clone();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run_job(ctx, driver))
        .map(|_| ())
        .map_err(|e| {
            if let Some(m) = j2.inner.manager.upgrade() {
                m.remove(&j2);
            }
            JobError::new(ErrorKind::InvalidState, "cannot spawn job thread").with_source(e)
        })
}

fn run_job(ctx: JobContext, mut driver: Box<dyn JobDriver>) {
    let job = ctx.job.clone();
    {
        let mut st = job.inner.state.lock();
        st.thread = Some(std::thread::current().id());
        job.transition_locked(&mut st, JobStatus::Running);
    }
    // A pause requested while created takes effect at the first pause point.
    let res = driver.run(&ctx);
    {
        let mut st = job.inner.state.lock();
        st.in_run = false;
        job.inner.cond.notify_all();
    }
    let cancelled =
        ctx.is_cancelled() || matches!(&res, Err(e) if e.kind() == ErrorKind::Cancelled);
    let mut outcome = match res {
        Ok(()) if !cancelled => JobOutcome::Completed,
        _ if cancelled => JobOutcome::Cancelled,
        Err(e) => JobOutcome::Failed(Arc::new(e)),
        Ok(()) => JobOutcome::Cancelled,
    };
    if outcome.is_ok() {
        {
            let mut st = job.inner.state.lock();
            job.transition_locked(&mut st, JobStatus::Waiting);
            job.transition_locked(&mut st, JobStatus::Pending);
        }
        if let Err(e) = driver.prepare(&ctx) {
            outcome = JobOutcome::Failed(Arc::new(e));
        }
    }
    if !outcome.is_ok() {
        {
            let mut st = job.inner.state.lock();
            job.transition_locked(&mut st, JobStatus::Aborting);
        }
        driver.abort(&ctx);
    }
    driver.clean(&ctx);
    // release everything the job holds (blockers, nodes, the drain
    // listener) before anyone can see it concluded
    drop(driver);
    drop(job.inner.drain_watch.lock().take());
    if job.inner.opts.auto_dismiss {
        // Out of the listings before the completion is announced: QEMU
        // emits BLOCK_JOB_COMPLETED and dismisses in one main-loop step, so
        // a client that got the event never finds the job in query-jobs.
        // (Lock order: registry before job state, so not under `st`.)
        if let Some(m) = job.inner.manager.upgrade() {
            m.remove(&job);
        }
    }
    let mut st = job.inner.state.lock();
    if let JobOutcome::Failed(e) = &outcome {
        st.error_msg = Some(e.full_message());
    }
    let info = job.info_locked(&st);
    match &outcome {
        JobOutcome::Cancelled => job.emit(JobEvent::Cancelled(info)),
        JobOutcome::Completed => job.emit(JobEvent::Completed { info, error: None }),
        JobOutcome::Failed(e) => job.emit(JobEvent::Completed {
            info,
            error: Some(e.full_message()),
        }),
    }
    job.transition_locked(&mut st, JobStatus::Concluded);
    if job.inner.opts.auto_dismiss {
        job.transition_locked(&mut st, JobStatus::Null);
    }
    st.outcome = Some(outcome);
    job.inner.cond.notify_all();
}
