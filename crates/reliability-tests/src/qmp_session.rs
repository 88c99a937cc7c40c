//! QMP target: the protocol without sockets (`qmp::Session`) over a registry
//! holding the daemon's own schema (`blockrep/src/serve/schema.rs`, included
//! as source so the fuzzer checks the argument shapes the daemon really
//! accepts). The handlers only echo their checked arguments: the parser,
//! the splitter, negotiation, `id` echo and argument checking against
//! unions, alternates, enums and lists are what is fuzzed.

use std::sync::{Arc, OnceLock};

use qmp::{Registry, Session};
use serde_json::Value;

use crate::Bytes;

use crate::daemon_schema::schema as daemon_schema;

/// The registry: the daemon's types and commands, each handler returning
/// its arguments back.
pub fn registry() -> Arc<Registry> {
    static REG: OnceLock<Arc<Registry>> = OnceLock::new();
    REG.get_or_init(|| {
        let mut reg = Registry::new();
        reg.define(daemon_schema::TYPES)
            .expect("the daemon's schema types parse");
        for (name, args) in daemon_schema::COMMANDS {
            reg.register(name, args, |a| Ok(a.to_value()))
                .expect("the daemon's command shapes parse");
        }
        Arc::new(reg)
    })
    .clone()
}

/// Byte 0: bit 0 negotiates capabilities first; the rest of byte 0 sets the
/// chunk size the input is fed in (so the splitter sees requests split at
/// every point). Every reply must be an object with exactly one of `return`
/// and `error` (and `id` only when the request had one).
pub fn session(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mode = b.u8();
    let mut s = Session::new(registry());
    let mut out = Vec::new();
    if mode & 1 != 0 {
        s.feed(br#"{"execute": "qmp_capabilities"}"#, &mut out);
        assert_eq!(out.len(), 1, "one reply to qmp_capabilities");
        assert!(s.negotiated(), "qmp_capabilities negotiates: {:?}", out[0]);
    }
    let chunk = usize::from(mode >> 1).max(1);
    let rest = b.rest();
    for piece in rest.chunks(chunk) {
        s.feed(piece, &mut out);
        if s.quit_requested() {
            break;
        }
    }
    for r in &out {
        check_reply(r);
    }
    let _ = qmp::json::parse(rest);
}

fn check_reply(r: &Value) {
    let Value::Object(m) = r else {
        panic!("a QMP reply that is not an object: {r}");
    };
    let has_return = m.contains_key("return");
    let has_error = m.contains_key("error");
    assert!(
        has_return != has_error,
        "a reply needs exactly one of return/error: {r}"
    );
    for k in m.keys() {
        assert!(
            matches!(k.as_str(), "return" | "error" | "id"),
            "unexpected member '{k}' in reply {r}"
        );
    }
    if let Some(e) = m.get("error") {
        assert!(
            e.get("class").is_some_and(Value::is_string)
                && e.get("desc").is_some_and(Value::is_string),
            "error without class and desc: {r}"
        );
    }
}
