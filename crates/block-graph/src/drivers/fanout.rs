//! Long-lived helper threads that carry a request to the other children of a
//! node that writes its children at once (quorum's `x-parallel-writes`).
//!
//! Starting a thread per request cost more than the request on a 2-core
//! machine: clone, a fresh stack mapped and unmapped, and the scheduler
//! placing a new task (about 100 µs a write in `strace` of the primary
//! daemon). The pool keeps threads that finished a job waiting for the next
//! one and starts a new thread only when none is idle, so the number of
//! threads follows the number of requests in flight; a thread idle for
//! [`IDLE_EXIT`] exits.
//!
//! Jobs own what they use (`'static`): a write's data is shared with the job,
//! never borrowed from the caller's stack.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

/// How long an idle helper waits for work before it exits.
pub(crate) const IDLE_EXIT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send + 'static>;

// std's futex-based Mutex/Condvar, as the NBD server's hand-offs: they wake a
// thread only when one waits, where spin-and-yield primitives cost
// sched_yield storms on a busy 2-core machine.
#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Helpers waiting for a job.
    idle: usize,
}

#[derive(Default)]
struct Pool {
    state: Mutex<State>,
    ready: Condvar,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(Pool::default)
}

/// Runs `job` on a helper thread: an idle one if there is one, else a new one.
/// Fails only if no thread can be started.
pub(crate) fn run(job: Job) -> std::io::Result<()> {
    let p = pool();
    {
        let mut st = p.lock();
        // Every queued job has an idle helper of its own.
        if st.idle > st.jobs.len() {
            st.jobs.push_back(job);
            drop(st);
            p.ready.notify_one();
            return Ok(());
        }
    }
    std::thread::Builder::new()
        .name("block-fanout".into())
        .spawn(move || {
            job();
            worker(pool());
        })
        .map(|_| ())
}

fn worker(p: &'static Pool) {
    loop {
        let job = {
            let mut st = p.lock();
            loop {
                if let Some(j) = st.jobs.pop_front() {
                    break j;
                }
                st.idle += 1;
                let (g, wait) = p
                    .ready
                    .wait_timeout(st, IDLE_EXIT)
                    .unwrap_or_else(PoisonError::into_inner);
                st = g;
                st.idle -= 1;
                if wait.timed_out() && st.jobs.is_empty() {
                    return;
                }
            }
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn jobs_run_and_threads_are_reused() {
        let ids = Arc::new(parking_lot::Mutex::new(Vec::new()));
        for i in 0..50u32 {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let ids = ids.clone();
            run(Box::new(move || {
                ids.lock().push(std::thread::current().id());
                tx.send(i * 2).unwrap();
            }))
            .unwrap();
            assert_eq!(rx.recv().unwrap(), i * 2);
        }
        let ids = ids.lock();
        let mut distinct = ids.clone();
        distinct.sort_by_key(|t| format!("{t:?}"));
        distinct.dedup();
        // One request at a time: the pool (shared with other tests in this
        // binary) did not start a thread per job.
        assert!(
            distinct.len() < 10,
            "{} threads for 50 jobs",
            distinct.len()
        );
    }

    #[test]
    fn blocked_jobs_do_not_hold_up_new_ones() {
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        for _ in 0..4 {
            let r = release_rx.clone();
            let d = done_tx.clone();
            run(Box::new(move || {
                r.recv().unwrap();
                d.send(1u8).unwrap();
            }))
            .unwrap();
        }
        let d = done_tx.clone();
        run(Box::new(move || d.send(2u8).unwrap())).unwrap();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)).unwrap(), 2);
        for _ in 0..4 {
            release_tx.send(()).unwrap();
        }
        let mut ones = 0;
        for _ in 0..4 {
            ones += done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        assert_eq!(ones, 4);
    }
}
