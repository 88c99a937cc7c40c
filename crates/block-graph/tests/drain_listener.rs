//! Drain listeners: called for sections covering their nodes (the closure:
//! subtree and ancestors), in order begin -> wait -> (nodes drained) -> end
//! after the nodes were released; not for unrelated nodes; gone with the guard.

use block_graph::*;
use parking_lot::Mutex;
use serde_json::json;
use std::sync::Arc;
use std::thread::ThreadId;

struct Recorder {
    node: NodeRef,
    log: Mutex<Vec<String>>,
}

impl DrainListener for Recorder {
    fn drained_begin(&self, owner: ThreadId) {
        assert_eq!(owner, std::thread::current().id());
        // not drained yet: a request of the listener's user still passes
        let mut b = [0u8; 512];
        self.node.read(0, &mut b).unwrap();
        self.log.lock().push("begin".into());
    }
    fn drained_wait(&self, _owner: ThreadId) {
        self.log.lock().push("wait".into());
    }
    fn drained_end(&self, _owner: ThreadId) {
        self.log.lock().push("end".into());
    }
}

#[test]
fn listener_sees_covering_sections_only() {
    let g = Graph::new();
    let base = g
        .add_node(&json!({"driver": "memory", "node-name": "base", "size": 65536}))
        .unwrap();
    let top = g
        .add_node(&json!({"driver": "memory", "node-name": "top", "backing": "base"}))
        .unwrap();
    let other = g
        .add_node(&json!({"driver": "memory", "node-name": "other", "size": 65536}))
        .unwrap();
    let rec = Arc::new(Recorder {
        node: top.clone(),
        log: Mutex::new(Vec::new()),
    });
    let guard = g.add_drain_listener(std::slice::from_ref(&base), rec.clone());

    // an unrelated node: not called
    drop(g.drain(std::slice::from_ref(&other)));
    assert!(rec.log.lock().is_empty());

    // draining top covers base (its subtree)
    {
        let _d = g.drain(std::slice::from_ref(&top));
        assert_eq!(*rec.log.lock(), vec!["begin", "wait"]);
        // nested: called once more
        let d2 = g.drain(std::slice::from_ref(&base));
        assert_eq!(rec.log.lock().len(), 4);
        drop(d2);
        assert_eq!(rec.log.lock().len(), 5);
    }
    assert_eq!(
        *rec.log.lock(),
        vec!["begin", "wait", "begin", "wait", "end", "end"]
    );

    // a graph change drains by itself: called too
    rec.log.lock().clear();
    g.detach_child(&top, &Role::Backing).unwrap();
    assert_eq!(*rec.log.lock(), vec!["begin", "wait", "end"]);

    // unregistered: never called again
    rec.log.lock().clear();
    drop(guard);
    drop(g.drain(std::slice::from_ref(&base)));
    assert!(rec.log.lock().is_empty());
}
