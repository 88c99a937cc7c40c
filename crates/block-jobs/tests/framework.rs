//! The job framework alone, with a synthetic driver: states, verbs, events,
//! pause/resume, cancel, error policies, speed limit, internal jobs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_jobs::{
    ErrorAction, ErrorKind, IoOperation, JobContext, JobDriver, JobError, JobEvent, JobManager,
    JobOptions, JobOutcome, JobStatus, JobType, OnError,
};

/// Copies `total` bytes in `chunk` steps; optionally waits in ready for complete;
/// fails the chunk at index `fail_at` `fail_times` times.
struct Synthetic {
    total: u64,
    chunk: u64,
    wants_ready: bool,
    fail_at: Option<u64>,
    fail_times: u32,
    fail_errno: Option<i32>,
    done: Arc<AtomicU64>,
    step_sleep: Duration,
    /// Once every `.0` of run time the job stalls `.1` after a throttle (a
    /// late wake-up or a slow request on a loaded machine).
    stall: Option<(Duration, Duration)>,
}

impl Synthetic {
    fn new(total: u64, chunk: u64) -> Self {
        Synthetic {
            total,
            chunk,
            wants_ready: false,
            fail_at: None,
            fail_times: 0,
            fail_errno: None,
            done: Arc::new(AtomicU64::new(0)),
            step_sleep: Duration::ZERO,
            stall: None,
        }
    }
}

impl JobDriver for Synthetic {
    fn job_type(&self) -> JobType {
        JobType::Mirror
    }

    fn run(&mut self, ctx: &JobContext) -> block_jobs::Result<()> {
        ctx.set_len(self.total);
        let mut off = 0;
        let mut idx = 0;
        let mut last_stall = Instant::now();
        while off < self.total {
            ctx.pause_point();
            if ctx.is_cancelled() {
                return Ok(());
            }
            if self.fail_at == Some(idx) && self.fail_times > 0 {
                self.fail_times -= 1;
                let e = JobError::new(ErrorKind::Io, format!("synthetic error at {off}"))
                    .with_errno(self.fail_errno);
                match ctx.io_error(IoOperation::Write, &e) {
                    ErrorAction::Report => return Err(e),
                    ErrorAction::Ignore | ErrorAction::Stop => continue,
                }
            }
            ctx.throttle(self.chunk);
            if !self.step_sleep.is_zero() {
                std::thread::sleep(self.step_sleep);
            }
            if let Some((every, d)) = self.stall {
                if last_stall.elapsed() >= every {
                    std::thread::sleep(d);
                    last_stall = Instant::now();
                }
            }
            off += self.chunk;
            idx += 1;
            ctx.add_progress(self.chunk);
            self.done.store(off, Ordering::SeqCst);
        }
        if self.wants_ready {
            ctx.set_ready();
            while !ctx.should_complete() && !ctx.cancel_requested() {
                ctx.sleep(Duration::from_millis(50));
                ctx.pause_point();
            }
        }
        Ok(())
    }
}

fn drain_events(rx: &crossbeam_channel::Receiver<JobEvent>) -> Vec<JobEvent> {
    rx.try_iter().collect()
}

fn statuses(evs: &[JobEvent]) -> Vec<JobStatus> {
    evs.iter()
        .filter_map(|e| match e {
            JobEvent::StatusChange { status, .. } => Some(*status),
            _ => None,
        })
        .collect()
}

#[test]
fn completes_with_events_and_auto_dismiss() {
    let m = JobManager::new();
    let rx = m.subscribe();
    let job = m
        .start(
            Box::new(Synthetic::new(1 << 20, 64 << 10)),
            JobOptions::with_id("j1"),
        )
        .unwrap();
    assert!(job.wait().is_ok());
    assert_eq!(job.progress(), (1 << 20, 1 << 20));
    let evs = drain_events(&rx);
    use JobStatus::*;
    assert_eq!(
        statuses(&evs),
        vec![Created, Running, Waiting, Pending, Concluded, Null]
    );
    assert!(evs.iter().any(|e| matches!(e, JobEvent::Completed { error: None, info } if info.offset == 1 << 20 && info.id.as_deref() == Some("j1"))));
    assert!(m.list().is_empty(), "auto-dismissed");
}

#[test]
fn ready_complete_and_soft_cancel() {
    let m = JobManager::new();
    let mut d = Synthetic::new(256 << 10, 64 << 10);
    d.wants_ready = true;
    d.step_sleep = Duration::from_millis(20);
    let job = m.start(Box::new(d), JobOptions::with_id("r")).unwrap();
    let e = job.complete().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidState);
    assert!(
        e.to_string()
            .contains("cannot accept command verb 'complete'"),
        "{e}"
    );
    assert!(job.wait_ready(Duration::from_secs(5)));
    assert_eq!(job.status(), JobStatus::Ready);
    job.complete().unwrap();
    assert!(job.wait().is_ok());

    // soft cancel after ready: completes, not cancelled
    let rx_m = m.subscribe();
    let mut d = Synthetic::new(128 << 10, 64 << 10);
    d.wants_ready = true;
    let job = m.start(Box::new(d), JobOptions::with_id("r2")).unwrap();
    assert!(job.wait_ready(Duration::from_secs(5)));
    job.cancel(false).unwrap();
    assert!(job.wait().is_ok());
    let evs = drain_events(&rx_m);
    assert!(evs
        .iter()
        .any(|e| matches!(e, JobEvent::Ready(i) if i.id.as_deref() == Some("r2"))));
    assert!(evs.iter().any(|e| matches!(e, JobEvent::Completed { .. })));
    assert!(!evs.iter().any(|e| matches!(e, JobEvent::Cancelled(_))));
}

#[test]
fn cancel_before_ready_and_forced() {
    let m = JobManager::new();
    let rx = m.subscribe();
    let mut d = Synthetic::new(1 << 30, 64 << 10);
    d.step_sleep = Duration::from_millis(1);
    let job = m.start(Box::new(d), JobOptions::with_id("c")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    job.cancel(false).unwrap();
    assert!(matches!(job.wait(), JobOutcome::Cancelled));
    let evs = drain_events(&rx);
    assert!(evs
        .iter()
        .any(|e| matches!(e, JobEvent::Cancelled(i) if i.id.as_deref() == Some("c"))));
    assert!(statuses(&evs).contains(&JobStatus::Aborting));

    let mut d = Synthetic::new(64 << 10, 64 << 10);
    d.wants_ready = true;
    let job = m.start(Box::new(d), JobOptions::with_id("f")).unwrap();
    assert!(job.wait_ready(Duration::from_secs(5)));
    job.cancel(true).unwrap();
    assert!(matches!(job.wait(), JobOutcome::Cancelled));
}

#[test]
fn pause_resume_stops_progress() {
    let m = JobManager::new();
    let rx = m.subscribe();
    let mut d = Synthetic::new(1 << 30, 64 << 10);
    d.step_sleep = Duration::from_millis(1);
    let done = d.done.clone();
    let job = m.start(Box::new(d), JobOptions::with_id("p")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    job.pause().unwrap();
    assert_eq!(job.pause().unwrap_err().kind(), ErrorKind::InvalidState);
    assert!(job.wait_paused(Duration::from_secs(5)));
    assert_eq!(job.status(), JobStatus::Paused);
    let at = done.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(done.load(Ordering::SeqCst), at, "no progress while paused");
    assert!(job.info().paused);
    job.resume().unwrap();
    assert_eq!(job.resume().unwrap_err().kind(), ErrorKind::InvalidState);
    std::thread::sleep(Duration::from_millis(50));
    assert!(done.load(Ordering::SeqCst) > at, "progress after resume");
    job.cancel(true).unwrap();
    assert!(matches!(job.wait(), JobOutcome::Cancelled));
    let st = statuses(&drain_events(&rx));
    let p = st.iter().position(|s| *s == JobStatus::Paused).unwrap();
    assert_eq!(st[p + 1], JobStatus::Running);
}

#[test]
fn cancel_wakes_paused_job() {
    let m = JobManager::new();
    let job = m
        .start(
            Box::new(Synthetic::new(1 << 40, 64 << 10)),
            JobOptions::with_id("x"),
        )
        .unwrap();
    job.pause().unwrap();
    assert!(job.wait_paused(Duration::from_secs(5)));
    job.cancel(false).unwrap();
    assert!(matches!(
        job.wait_timeout(Duration::from_secs(5)),
        Some(JobOutcome::Cancelled)
    ));
}

#[test]
fn error_policies() {
    let m = JobManager::new();
    let rx = m.subscribe();
    // report: job fails with the error, BLOCK_JOB_ERROR action report
    let mut d = Synthetic::new(512 << 10, 64 << 10);
    d.fail_at = Some(2);
    d.fail_times = 1;
    let job = m.start(Box::new(d), JobOptions::with_id("rep")).unwrap();
    match job.wait() {
        JobOutcome::Failed(e) => assert_eq!(e.kind(), ErrorKind::Io),
        o => panic!("{o:?}"),
    }
    let evs = drain_events(&rx);
    assert!(evs.iter().any(|e| matches!(
        e,
        JobEvent::Error {
            action: ErrorAction::Report,
            operation: IoOperation::Write,
            ..
        }
    )));
    assert!(evs.iter().any(|e| matches!(e, JobEvent::Completed { error: Some(msg), .. } if msg.contains("synthetic error at 131072"))));

    // ignore: goes on
    let mut d = Synthetic::new(512 << 10, 64 << 10);
    d.fail_at = Some(2);
    d.fail_times = 3;
    let opts = JobOptions {
        on_target_error: OnError::Ignore,
        ..JobOptions::with_id("ign")
    };
    let job = m.start(Box::new(d), opts).unwrap();
    assert!(job.wait().is_ok());
    let evs = drain_events(&rx);
    assert_eq!(
        evs.iter()
            .filter(|e| matches!(
                e,
                JobEvent::Error {
                    action: ErrorAction::Ignore,
                    ..
                }
            ))
            .count(),
        3
    );

    // stop: job pauses, resume retries and succeeds
    let mut d = Synthetic::new(512 << 10, 64 << 10);
    d.fail_at = Some(1);
    d.fail_times = 1;
    let opts = JobOptions {
        on_target_error: OnError::Stop,
        ..JobOptions::with_id("stp")
    };
    let job = m.start(Box::new(d), opts).unwrap();
    assert!(job.wait_paused(Duration::from_secs(5)));
    assert_eq!(job.status(), JobStatus::Paused);
    assert!(job.wait_timeout(Duration::from_millis(100)).is_none());
    job.resume().unwrap();
    assert!(job.wait().is_ok());
    let evs = drain_events(&rx);
    assert!(evs.iter().any(|e| matches!(
        e,
        JobEvent::Error {
            action: ErrorAction::Stop,
            ..
        }
    )));

    // enospc: stop on ENOSPC, report otherwise
    let mut d = Synthetic::new(256 << 10, 64 << 10);
    d.fail_at = Some(0);
    d.fail_times = 1;
    d.fail_errno = Some(5);
    let opts = JobOptions {
        on_target_error: OnError::Enospc,
        ..JobOptions::with_id("eio")
    };
    let job = m.start(Box::new(d), opts).unwrap();
    assert!(matches!(job.wait(), JobOutcome::Failed(_)));
    let mut d = Synthetic::new(256 << 10, 64 << 10);
    d.fail_at = Some(0);
    d.fail_times = 1;
    d.fail_errno = Some(28);
    let opts = JobOptions {
        on_target_error: OnError::Enospc,
        ..JobOptions::with_id("nospc")
    };
    let job = m.start(Box::new(d), opts).unwrap();
    assert!(job.wait_paused(Duration::from_secs(5)));
    job.resume().unwrap();
    assert!(job.wait().is_ok());
}

#[test]
fn ids_unique_internal_hidden_dismiss() {
    let m = JobManager::new();
    let rx = m.subscribe();
    let mut d = Synthetic::new(64 << 10, 64 << 10);
    d.wants_ready = true;
    let opts = JobOptions {
        auto_dismiss: false,
        ..JobOptions::with_id("u")
    };
    let j = m.start(Box::new(d), opts).unwrap();
    let mut d = Synthetic::new(64 << 10, 64 << 10);
    d.wants_ready = true;
    let e = m.start(Box::new(d), JobOptions::with_id("u")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DuplicateId);
    let e = m
        .start(Box::new(Synthetic::new(0, 1)), JobOptions::with_id("1bad"))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);

    let mut d = Synthetic::new(64 << 10, 64 << 10);
    d.wants_ready = true;
    let internal = m.start(Box::new(d), JobOptions::default()).unwrap();
    let irx = internal.subscribe();
    assert!(internal.wait_ready(Duration::from_secs(5)));
    assert!(j.wait_ready(Duration::from_secs(5)));
    let list = m.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id.as_deref(), Some("u"));
    assert_eq!(m.all().len(), 2);
    assert_eq!(m.find("u").unwrap().id(), Some("u"));
    assert_eq!(m.find("nope").unwrap_err().kind(), ErrorKind::NotFound);

    internal.complete().unwrap();
    assert!(internal.wait().is_ok());
    // the internal job's own channel sees its events; the manager's does not
    let ievs: Vec<_> = irx.try_iter().collect();
    assert!(ievs.iter().any(|e| matches!(e, JobEvent::Completed { .. })));
    let evs = drain_events(&rx);
    assert!(evs.iter().all(|e| match e {
        JobEvent::StatusChange { id, .. } => id.is_some(),
        JobEvent::Ready(i) | JobEvent::Cancelled(i) => i.id.is_some(),
        JobEvent::Completed { info, .. } => info.id.is_some(),
        JobEvent::Error { id, .. } => id.is_some(),
    }));

    assert_eq!(j.dismiss().unwrap_err().kind(), ErrorKind::InvalidState);
    j.complete().unwrap();
    assert!(j.wait().is_ok());
    assert_eq!(j.status(), JobStatus::Concluded);
    assert_eq!(
        m.list().len(),
        1,
        "concluded job stays listed until dismissed"
    );
    j.dismiss().unwrap();
    assert_eq!(j.status(), JobStatus::Null);
    assert!(m.list().is_empty());
}

/// Bytes moved over a 3 s window from the job's start, in MiB/s: the
/// progress and the elapsed time are read together at the window's end.
fn rate_over_3s(m: &JobManager, d: Synthetic, id: &str) -> f64 {
    let opts = JobOptions {
        speed: 10 << 20,
        ..JobOptions::with_id(id)
    };
    let t0 = Instant::now();
    let job = m.start(Box::new(d), opts).unwrap();
    let end = t0 + Duration::from_secs(3);
    while Instant::now() < end {
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
    }
    let (off, _) = job.progress();
    let secs = t0.elapsed().as_secs_f64();
    job.cancel(true).unwrap();
    job.wait();
    off as f64 / secs / (1 << 20) as f64
}

#[test]
fn speed_limit_10mib_over_3s() {
    let m = JobManager::new();
    let rate = rate_over_3s(&m, Synthetic::new(1 << 40, 64 << 10), "speed");
    assert!((9.0..=11.0).contains(&rate), "rate {rate} MiB/s");
}

/// Stalls longer than the 100 ms burst (as on a loaded machine) are caught
/// up: the rate over the window stays 10 MiB/s ± 10%.
#[test]
fn speed_limit_catches_up_after_stalls() {
    let m = JobManager::new();
    let mut d = Synthetic::new(1 << 40, 64 << 10);
    // 250 ms stalls (2.5 times the 100 ms burst) every 500 ms of running
    d.stall = Some((Duration::from_millis(500), Duration::from_millis(250)));
    let rate = rate_over_3s(&m, d, "stalls");
    assert!((9.0..=11.0).contains(&rate), "rate {rate} MiB/s");
}

#[test]
fn set_speed_changes_rate_and_wakes() {
    let m = JobManager::new();
    let d = Synthetic::new(1 << 40, 64 << 10);
    let opts = JobOptions {
        speed: 1,
        ..JobOptions::with_id("slow")
    };
    let job = m.start(Box::new(d), opts).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // at 1 B/s, the job sleeps ~18 h after its first chunk
    assert_eq!(job.progress().0, 64 << 10);
    job.set_speed(0).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(job.progress().0 > 64 << 10);
    job.cancel(true).unwrap();
    assert!(job.wait_timeout(Duration::from_secs(5)).is_some());
}
