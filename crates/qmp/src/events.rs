//! Asynchronous events: `{"event": NAME, "data": {...}, "timestamp": {...}}`,
//! broadcast to every negotiated client.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use serde_json::{json, Map, Value};

/// Queue length per subscriber; a subscriber that falls this far behind is
/// dropped (a client connection is closed) rather than letting memory grow.
pub const SUBSCRIBER_QUEUE: usize = 4096;

/// One event, stamped with the time it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, upper case by QEMU's convention (`BLOCK_JOB_COMPLETED`).
    pub name: String,
    /// Event data; `None` omits the `data` member.
    pub data: Option<Map<String, Value>>,
    /// Seconds since the Unix epoch (-1 if the clock failed, as in QEMU).
    pub seconds: i64,
    /// Microseconds within the second (-1 if the clock failed).
    pub microseconds: i64,
}

impl Event {
    /// An event happening now. `data` must be a JSON object or `null`
    /// (no data); any other value is wrapped as `{"value": ...}`.
    pub fn new(name: impl Into<String>, data: Value) -> Self {
        let (seconds, microseconds) = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_micros())),
            Err(_) => (-1, -1),
        };
        let data = match data {
            Value::Null => None,
            Value::Object(m) => Some(m),
            other => {
                let mut m = Map::new();
                m.insert("value".to_string(), other);
                Some(m)
            }
        };
        Event {
            name: name.into(),
            data,
            seconds,
            microseconds,
        }
    }

    /// The message as sent on the wire.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "event": self.name,
            "timestamp": {"seconds": self.seconds, "microseconds": self.microseconds},
        });
        if let (Some(d), Some(o)) = (&self.data, v.as_object_mut()) {
            o.insert("data".to_string(), Value::Object(d.clone()));
        }
        v
    }
}

/// Delivers one event; returns false when the subscriber is gone (or was
/// too far behind and has been disconnected) and must be dropped.
pub(crate) type Sink = Box<dyn Fn(&Arc<Event>) -> bool + Send + Sync>;

struct Sub {
    id: u64,
    sink: Sink,
}

#[derive(Default)]
struct Subs {
    next_id: u64,
    list: Vec<Sub>,
}

/// A cheap, clonable handle that broadcasts events; usable from any thread
/// (job threads, NBD threads, command handlers).
///
/// Every [`crate::Registry`] owns one ([`crate::Registry::events`]); a
/// server started with that registry delivers its events to every client
/// that has completed capabilities negotiation.
#[derive(Clone, Default)]
pub struct EventEmitter {
    subs: Arc<Mutex<Subs>>,
}

impl std::fmt::Debug for EventEmitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventEmitter")
            .field("subscribers", &self.subs.lock().list.len())
            .finish()
    }
}

impl EventEmitter {
    /// An emitter with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Emits an event named `name` with `data` (an object, or `null` for none).
    pub fn emit(&self, name: &str, data: Value) {
        self.emit_event(Event::new(name, data));
    }

    /// Emits a prepared event (its timestamp is kept).
    pub fn emit_event(&self, ev: Event) {
        let ev = Arc::new(ev);
        let mut subs = self.subs.lock();
        subs.list.retain(|s| (s.sink)(&ev));
    }

    /// An in-process subscription (tests, logging). The receiver gets every
    /// event emitted from now on; it is dropped from the list once it is
    /// gone or [`SUBSCRIBER_QUEUE`] events behind.
    pub fn subscribe(&self) -> Receiver<Arc<Event>> {
        let (tx, rx) = crossbeam_channel::bounded(SUBSCRIBER_QUEUE);
        self.add(channel_sink(tx, || {}));
        rx
    }

    /// Broadcasts every event received on `rx` until all its senders are
    /// gone; returns the forwarding thread.
    pub fn forward(&self, rx: Receiver<Event>) -> std::io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("qmp-event-forward".to_string())
            .spawn(move || {
                for ev in rx {
                    me.emit_event(ev);
                }
            })
    }

    /// Number of current subscribers.
    pub fn subscribers(&self) -> usize {
        self.subs.lock().list.len()
    }

    pub(crate) fn add(&self, sink: Sink) -> u64 {
        let mut subs = self.subs.lock();
        subs.next_id += 1;
        let id = subs.next_id;
        subs.list.push(Sub { id, sink });
        id
    }

    /// Runs `before`, then adds `sink`, as one step for [`Self::emit`]: an
    /// event is either emitted before `before` ran (and not delivered to
    /// `sink`) or after it (and delivered). The server queues the
    /// `qmp_capabilities` reply in `before`, so no event can overtake it
    /// and none emitted after the client has read it is lost.
    pub(crate) fn add_after(&self, before: impl FnOnce(), sink: Sink) -> u64 {
        let mut subs = self.subs.lock();
        before();
        subs.next_id += 1;
        let id = subs.next_id;
        subs.list.push(Sub { id, sink });
        id
    }

    pub(crate) fn remove(&self, id: u64) {
        self.subs.lock().list.retain(|s| s.id != id);
    }
}

/// A sink into a bounded channel; `kick` runs when the channel is full.
pub(crate) fn channel_sink<T, F>(tx: Sender<T>, kick: F) -> Sink
where
    T: From<Arc<Event>> + Send + 'static,
    F: Fn() + Send + Sync + 'static,
{
    Box::new(move |ev| match tx.try_send(T::from(Arc::clone(ev))) {
        Ok(()) => true,
        Err(TrySendError::Disconnected(_)) => false,
        Err(TrySendError::Full(_)) => {
            kick();
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_shape() {
        let e = Event::new("BLOCK_JOB_READY", json!({"device": "j0"}));
        let v = e.to_json();
        assert_eq!(v["event"], "BLOCK_JOB_READY");
        assert_eq!(v["data"], json!({"device": "j0"}));
        assert!(v["timestamp"]["seconds"].as_i64().unwrap() > 1_600_000_000);
        let us = v["timestamp"]["microseconds"].as_i64().unwrap();
        assert!((0..1_000_000).contains(&us));
        let v = Event::new("STOP", Value::Null).to_json();
        assert!(v.get("data").is_none());
    }

    #[test]
    fn broadcast_and_drop_dead_subscribers() {
        let em = EventEmitter::new();
        let a = em.subscribe();
        let b = em.subscribe();
        em.emit("X", json!({"n": 1}));
        assert_eq!(a.recv().unwrap().name, "X");
        assert_eq!(b.recv().unwrap().data.as_ref().unwrap()["n"], 1);
        drop(b);
        em.emit("Y", Value::Null);
        assert_eq!(em.subscribers(), 1);
        assert_eq!(a.recv().unwrap().name, "Y");
    }

    #[test]
    fn forward_from_channel() {
        let em = EventEmitter::new();
        let rx = em.subscribe();
        let (tx, frx) = crossbeam_channel::unbounded();
        let h = em.forward(frx).unwrap();
        tx.send(Event::new(
            "JOB_STATUS_CHANGE",
            json!({"id": "j", "status": "running"}),
        ))
        .unwrap();
        drop(tx);
        h.join().unwrap();
        assert_eq!(rx.recv().unwrap().name, "JOB_STATUS_CHANGE");
    }

    #[test]
    fn slow_subscriber_is_kicked() {
        let em = EventEmitter::new();
        let (tx, rx) = crossbeam_channel::bounded(2);
        let kicked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let k2 = Arc::clone(&kicked);
        em.add(channel_sink::<Arc<Event>, _>(tx, move || {
            k2.store(true, std::sync::atomic::Ordering::SeqCst)
        }));
        for _ in 0..3 {
            em.emit("E", Value::Null);
        }
        assert!(kicked.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(em.subscribers(), 0);
        assert_eq!(rx.len(), 2);
    }
}
