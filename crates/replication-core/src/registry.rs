//! The replication member registry (QEMU's `replication.c`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use crate::{Error, OpError, ReplicationMode, ReplicationOp};

/// One member of a replication pair (QEMU's `ReplicationOps`), e.g. a
/// `replication` filter node.
///
/// Every operation has a default that succeeds and does nothing, as QEMU
/// skips a callback that is absent.
pub trait ReplicationOps: Send + Sync {
    /// The name errors use to say which member failed (e.g. the node-name).
    fn name(&self) -> String;

    /// Start replicating in `mode`. Called with the guest stopped.
    fn start(&self, mode: ReplicationMode) -> Result<(), OpError> {
        let _ = mode;
        Ok(())
    }

    /// Take a checkpoint: called after all VM state reached the secondary.
    fn checkpoint(&self) -> Result<(), OpError> {
        Ok(())
    }

    /// Report an error that happened during replication, if any.
    fn get_error(&self) -> Result<(), OpError> {
        Ok(())
    }

    /// Stop replicating; `failover` promotes the secondary.
    fn stop(&self, failover: bool) -> Result<(), OpError> {
        let _ = failover;
        Ok(())
    }
}

struct Entry {
    id: u64,
    member: Arc<dyn ReplicationOps>,
}

#[derive(Default)]
struct Inner {
    /// In registration order; `*_all` walks it backwards.
    members: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
}

impl Inner {
    fn is_registered(&self, id: u64) -> bool {
        self.members.lock().iter().any(|e| e.id == id)
    }

    fn remove(&self, id: u64) -> bool {
        let removed = {
            let mut members = self.members.lock();
            members
                .iter()
                .position(|e| e.id == id)
                .map(|pos| members.remove(pos))
        };
        // The member's Arc is dropped here, outside the lock, so a member
        // whose Drop touches the registry cannot deadlock.
        removed.is_some()
    }
}

/// The set of replication members (QEMU's `replication_states` list).
///
/// A cheap, cloneable handle: clones share the same members. The program owns
/// it and passes it around; [`global`] exists only as a convenience.
///
/// `*_all` calls take a snapshot of the members under a lock, release the
/// lock, and call each member (most recently registered first) only if it is
/// still registered at that moment. So a member may register or unregister
/// members (itself included) from inside a callback, other threads may do so
/// concurrently, and a member registered for the whole call is called
/// exactly once; members registered during the call are not called.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("members", &self.names())
            .finish()
    }
}

/// Keeps a member registered; dropping it (or calling
/// [`remove`](RegistrationHandle::remove)) unregisters the member
/// (QEMU's `replication_remove`).
#[must_use = "dropping the handle unregisters the member at once"]
pub struct RegistrationHandle {
    registry: Weak<Inner>,
    id: u64,
}

impl std::fmt::Debug for RegistrationHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrationHandle")
            .field("id", &self.id)
            .finish()
    }
}

impl RegistrationHandle {
    /// Unregister the member now. Returns whether it was still registered.
    pub fn remove(self) -> bool {
        self.remove_inner()
    }

    /// Whether the member is still registered.
    pub fn is_registered(&self) -> bool {
        self.registry
            .upgrade()
            .is_some_and(|inner| inner.is_registered(self.id))
    }

    fn remove_inner(&self) -> bool {
        self.registry
            .upgrade()
            .is_some_and(|inner| inner.remove(self.id))
    }
}

impl Drop for RegistrationHandle {
    fn drop(&mut self) {
        self.remove_inner();
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a member (QEMU's `replication_new`). It stays registered while the
    /// returned handle lives.
    pub fn register(&self, member: Arc<dyn ReplicationOps>) -> RegistrationHandle {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.members.lock().push(Entry { id, member });
        RegistrationHandle {
            registry: Arc::downgrade(&self.inner),
            id,
        }
    }

    /// Number of registered members.
    pub fn len(&self) -> usize {
        self.inner.members.lock().len()
    }

    /// Whether no member is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Names of the members in call order (most recently registered first).
    pub fn names(&self) -> Vec<String> {
        self.snapshot().iter().map(|(_, m)| m.name()).collect()
    }

    fn snapshot(&self) -> Vec<(u64, Arc<dyn ReplicationOps>)> {
        self.inner
            .members
            .lock()
            .iter()
            .rev()
            .map(|e| (e.id, Arc::clone(&e.member)))
            .collect()
    }

    fn for_each(
        &self,
        op: ReplicationOp,
        call: impl Fn(&dyn ReplicationOps) -> Result<(), OpError>,
    ) -> Result<(), Error> {
        for (id, member) in self.snapshot() {
            if !self.inner.is_registered(id) {
                continue;
            }
            call(member.as_ref()).map_err(|source| Error::Member {
                member: member.name(),
                op,
                source,
            })?;
        }
        Ok(())
    }

    /// Start every member in `mode` (QEMU's `replication_start_all`); the
    /// caller makes sure the guest is stopped. Stops at the first error.
    pub fn start_all(&self, mode: ReplicationMode) -> Result<(), Error> {
        self.for_each(ReplicationOp::Start, |m| m.start(mode))
    }

    /// Checkpoint every member (QEMU's `replication_do_checkpoint_all`).
    /// Stops at the first error.
    pub fn checkpoint_all(&self) -> Result<(), Error> {
        self.for_each(ReplicationOp::Checkpoint, |m| m.checkpoint())
    }

    /// Ask every member for a replication error (QEMU's
    /// `replication_get_error_all`). Returns the first one.
    pub fn get_error_all(&self) -> Result<(), Error> {
        self.for_each(ReplicationOp::GetError, |m| m.get_error())
    }

    /// Stop every member (QEMU's `replication_stop_all`); `failover` promotes
    /// the secondary. Stops at the first error.
    pub fn stop_all(&self, failover: bool) -> Result<(), Error> {
        self.for_each(ReplicationOp::Stop, |m| m.stop(failover))
    }
}

/// A process-wide registry, for programs that want QEMU's single list.
/// Libraries should take a [`Registry`] instead of using this.
pub fn global() -> &'static Registry {
    static GLOBAL: OnceLock<Registry> = OnceLock::new();
    GLOBAL.get_or_init(Registry::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Barrier;
    use std::thread;

    type Log = Arc<Mutex<Vec<String>>>;

    struct Rec {
        name: String,
        log: Log,
        fail_on: Option<ReplicationOp>,
    }

    impl Rec {
        fn new(name: &str, log: &Log) -> Arc<Self> {
            Arc::new(Rec {
                name: name.into(),
                log: Arc::clone(log),
                fail_on: None,
            })
        }
        fn failing(name: &str, log: &Log, op: ReplicationOp) -> Arc<Self> {
            Arc::new(Rec {
                name: name.into(),
                log: Arc::clone(log),
                fail_on: Some(op),
            })
        }
        fn hit(&self, what: String, op: ReplicationOp) -> Result<(), OpError> {
            self.log.lock().push(format!("{}:{what}", self.name));
            if self.fail_on == Some(op) {
                return Err(format!("{} refuses {op}", self.name).into());
            }
            Ok(())
        }
    }

    impl ReplicationOps for Rec {
        fn name(&self) -> String {
            self.name.clone()
        }
        fn start(&self, mode: ReplicationMode) -> Result<(), OpError> {
            self.hit(format!("start({mode})"), ReplicationOp::Start)
        }
        fn checkpoint(&self) -> Result<(), OpError> {
            self.hit("checkpoint".into(), ReplicationOp::Checkpoint)
        }
        fn get_error(&self) -> Result<(), OpError> {
            self.hit("get_error".into(), ReplicationOp::GetError)
        }
        fn stop(&self, failover: bool) -> Result<(), OpError> {
            self.hit(format!("stop({failover})"), ReplicationOp::Stop)
        }
    }

    fn take(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.lock())
    }

    #[test]
    fn calls_most_recently_registered_first() {
        let reg = Registry::new();
        let log = Log::default();
        let _a = reg.register(Rec::new("a", &log));
        let _b = reg.register(Rec::new("b", &log));
        let _c = reg.register(Rec::new("c", &log));
        assert_eq!(reg.names(), ["c", "b", "a"]);
        reg.start_all(ReplicationMode::Secondary).unwrap();
        assert_eq!(
            take(&log),
            [
                "c:start(secondary)",
                "b:start(secondary)",
                "a:start(secondary)"
            ]
        );
        reg.checkpoint_all().unwrap();
        assert_eq!(take(&log), ["c:checkpoint", "b:checkpoint", "a:checkpoint"]);
        reg.get_error_all().unwrap();
        assert_eq!(take(&log), ["c:get_error", "b:get_error", "a:get_error"]);
        reg.stop_all(true).unwrap();
        assert_eq!(take(&log), ["c:stop(true)", "b:stop(true)", "a:stop(true)"]);
    }

    #[test]
    fn stops_at_first_error_and_names_member() {
        for op in [
            ReplicationOp::Start,
            ReplicationOp::Checkpoint,
            ReplicationOp::GetError,
            ReplicationOp::Stop,
        ] {
            let reg = Registry::new();
            let log = Log::default();
            let _a = reg.register(Rec::new("a", &log));
            let _b = reg.register(Rec::failing("disk-b", &log, op));
            let _c = reg.register(Rec::new("c", &log));
            let err = match op {
                ReplicationOp::Start => reg.start_all(ReplicationMode::Primary),
                ReplicationOp::Checkpoint => reg.checkpoint_all(),
                ReplicationOp::GetError => reg.get_error_all(),
                ReplicationOp::Stop => reg.stop_all(false),
            }
            .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Member);
            assert_eq!(err.member(), Some("disk-b"));
            match &err {
                Error::Member { op: got, .. } => assert_eq!(*got, op),
                other => panic!("unexpected {other:?}"),
            }
            let msg = err.to_string();
            assert!(
                msg.contains("'disk-b'") && msg.contains(&op.to_string()),
                "{msg}"
            );
            // c was called, b failed, a was not called.
            let calls = take(&log);
            assert_eq!(calls.len(), 2, "{calls:?}");
            assert!(calls[0].starts_with("c:") && calls[1].starts_with("disk-b:"));
        }
    }

    #[test]
    fn default_methods_succeed() {
        struct Bare;
        impl ReplicationOps for Bare {
            fn name(&self) -> String {
                "bare".into()
            }
        }
        let reg = Registry::new();
        let _h = reg.register(Arc::new(Bare));
        reg.start_all(ReplicationMode::Primary).unwrap();
        reg.checkpoint_all().unwrap();
        reg.get_error_all().unwrap();
        reg.stop_all(false).unwrap();
    }

    #[test]
    fn drop_and_remove_unregister() {
        let reg = Registry::new();
        let log = Log::default();
        let a = reg.register(Rec::new("a", &log));
        let b = reg.register(Rec::new("b", &log));
        assert_eq!(reg.len(), 2);
        drop(a);
        assert_eq!(reg.names(), ["b"]);
        assert!(b.is_registered());
        assert!(b.remove());
        assert!(reg.is_empty());
        reg.checkpoint_all().unwrap();
        assert!(take(&log).is_empty());
    }

    #[test]
    fn handle_outliving_registry_is_harmless() {
        let log = Log::default();
        let h = {
            let reg = Registry::new();
            reg.register(Rec::new("a", &log))
        };
        assert!(!h.is_registered());
        assert!(!h.remove());
    }

    #[test]
    fn clones_share_members() {
        let reg = Registry::new();
        let other = reg.clone();
        let log = Log::default();
        let _h = other.register(Rec::new("a", &log));
        reg.checkpoint_all().unwrap();
        assert_eq!(take(&log), ["a:checkpoint"]);
    }

    /// A member that runs an action from inside its checkpoint callback.
    struct Hook {
        name: String,
        log: Log,
        action: Box<dyn Fn() + Send + Sync>,
    }
    impl ReplicationOps for Hook {
        fn name(&self) -> String {
            self.name.clone()
        }
        fn checkpoint(&self) -> Result<(), OpError> {
            self.log.lock().push(format!("{}:checkpoint", self.name));
            (self.action)();
            Ok(())
        }
    }

    #[test]
    fn member_unregisters_itself_and_another_from_callback() {
        let reg = Registry::new();
        let log = Log::default();
        let slot_self: Arc<Mutex<Option<RegistrationHandle>>> = Arc::default();
        let slot_other: Arc<Mutex<Option<RegistrationHandle>>> = Arc::default();
        let _a = reg.register(Rec::new("a", &log));
        *slot_other.lock() = Some(reg.register(Rec::new("victim", &log)));
        let (s1, s2) = (Arc::clone(&slot_self), Arc::clone(&slot_other));
        let hook = Arc::new(Hook {
            name: "hook".into(),
            log: Arc::clone(&log),
            action: Box::new(move || {
                drop(s1.lock().take());
                if let Some(h) = s2.lock().take() {
                    assert!(h.remove());
                }
            }),
        });
        *slot_self.lock() = Some(reg.register(hook));
        reg.checkpoint_all().unwrap();
        // hook ran first, removed itself and victim; victim was not called.
        assert_eq!(take(&log), ["hook:checkpoint", "a:checkpoint"]);
        assert_eq!(reg.names(), ["a"]);
        reg.checkpoint_all().unwrap();
        assert_eq!(take(&log), ["a:checkpoint"]);
    }

    #[test]
    fn registering_from_callback_does_not_deadlock_and_is_not_called() {
        let reg = Registry::new();
        let log = Log::default();
        let kept: Arc<Mutex<Vec<RegistrationHandle>>> = Arc::default();
        let (r, l, k) = (reg.clone(), Arc::clone(&log), Arc::clone(&kept));
        let _hook = reg.register(Arc::new(Hook {
            name: "hook".into(),
            log: Arc::clone(&log),
            action: Box::new(move || k.lock().push(r.register(Rec::new("late", &l)))),
        }));
        let _a = reg.register(Rec::new("a", &log));
        reg.checkpoint_all().unwrap();
        assert_eq!(take(&log), ["a:checkpoint", "hook:checkpoint"]);
        reg.checkpoint_all().unwrap();
        assert_eq!(
            take(&log),
            ["late:checkpoint", "a:checkpoint", "hook:checkpoint"]
        );
    }

    struct Counter {
        name: String,
        calls: AtomicUsize,
    }
    impl ReplicationOps for Counter {
        fn name(&self) -> String {
            self.name.clone()
        }
        fn checkpoint(&self) -> Result<(), OpError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            thread::yield_now();
            Ok(())
        }
    }

    #[test]
    fn concurrent_registration_during_all_calls_stable_members_once() {
        let reg = Registry::new();
        let stable: Vec<Arc<Counter>> = (0..8)
            .map(|i| {
                Arc::new(Counter {
                    name: format!("stable{i}"),
                    calls: AtomicUsize::new(0),
                })
            })
            .collect();
        let _handles: Vec<_> = stable
            .iter()
            .map(|c| reg.register(Arc::clone(c) as Arc<dyn ReplicationOps>))
            .collect();
        const ROUNDS: usize = 200;
        let barrier = Barrier::new(3);
        thread::scope(|s| {
            for t in 0..2 {
                let reg = reg.clone();
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..ROUNDS * 2 {
                        let h = reg.register(Arc::new(Counter {
                            name: format!("churn{t}-{i}"),
                            calls: AtomicUsize::new(0),
                        }));
                        thread::yield_now();
                        drop(h);
                    }
                });
            }
            barrier.wait();
            for _ in 0..ROUNDS {
                reg.checkpoint_all().unwrap();
            }
        });
        for c in &stable {
            assert_eq!(c.calls.load(Ordering::SeqCst), ROUNDS, "{}", c.name);
        }
        assert_eq!(reg.len(), stable.len());
    }

    #[test]
    fn global_is_one_registry() {
        let log = Log::default();
        let h = global().register(Rec::new("global-test-member", &log));
        assert!(global().names().contains(&"global-test-member".to_string()));
        drop(h);
        assert!(!global().names().contains(&"global-test-member".to_string()));
    }
}
