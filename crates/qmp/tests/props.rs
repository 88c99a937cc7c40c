//! Property tests: random bytes, random JSON and random commands with random
//! arguments never crash or hang the protocol, every complete request gets
//! exactly one answer (with its id), handlers run only on valid arguments,
//! and the socket server answers exactly as the in-process session does.
//! `PROPTEST_CASES` raises the number of cases.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{demo_registry, Client, Probe};
use proptest::prelude::*;
use qmp::{Server, ServerConfig, Session};
use serde_json::{json, Map, Value};

fn session(probe: &Arc<Probe>) -> Session {
    Session::new(Arc::new(demo_registry(Arc::clone(probe))))
}

fn feed_chunks(s: &mut Session, bytes: &[u8], cuts: &[usize]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts {
        let end = (at + c).min(bytes.len());
        s.feed(&bytes[at..end], &mut out);
        at = end;
    }
    s.feed(&bytes[at..], &mut out);
    out
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e9f64..1e9).prop_map(|f| json!(f)),
        ".{0,8}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn args() -> impl Strategy<Value = Map<String, Value>> {
    let key = prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("device".to_string()),
        Just("enable".to_string()),
        Just("x".to_string()),
    ];
    prop_oneof![
        (any::<i64>(), any::<i64>()).prop_map(|(a, b)| {
            let mut m = Map::new();
            m.insert("a".into(), json!(a));
            m.insert("b".into(), json!(b));
            m
        }),
        ".{0,6}".prop_map(|d| {
            let mut m = Map::new();
            m.insert("device".into(), json!(d));
            m
        }),
        Just(Map::new()),
        prop::collection::btree_map(key, json_value(), 0..4).prop_map(|m| m.into_iter().collect()),
    ]
}

fn request() -> impl Strategy<Value = Value> {
    let name = prop_oneof![
        Just("x-add"),
        Just("x-fail"),
        Just("query-version"),
        Just("query-commands"),
        Just("qmp_capabilities"),
        Just("no-such"),
        Just(""),
    ];
    let shaped = (
        name,
        prop::option::of(args()),
        prop::option::of(json_value()),
        0u8..12,
    )
        .prop_map(|(name, args, id, twist)| {
            let mut m = Map::new();
            m.insert("execute".into(), json!(name));
            if let Some(a) = args {
                m.insert("arguments".into(), Value::Object(a));
            }
            if let Some(id) = id {
                m.insert("id".into(), id);
            }
            match twist {
                0 => {
                    m.remove("execute");
                }
                1 => {
                    m.insert("execute".into(), json!(7));
                }
                2 => {
                    m.insert("arguments".into(), json!([1]));
                }
                3 => {
                    m.insert("extra".into(), json!(1));
                }
                4 => {
                    let e = m.remove("execute").unwrap_or(Value::Null);
                    m.insert("exec-oob".into(), e);
                }
                _ => {}
            }
            Value::Object(m)
        });
    prop_oneof![8 => shaped, 1 => json_value()]
}

/// What the dispatcher must answer, modelled independently.
#[derive(Debug, PartialEq)]
enum Expect {
    Return(Value),
    Error(&'static str),
}

fn model(req: &Value, negotiated: &mut bool, version: &Value, commands: &Value) -> Expect {
    let Some(obj) = req.as_object() else {
        return Expect::Error("GenericError");
    };
    if obj
        .keys()
        .any(|k| !matches!(k.as_str(), "execute" | "arguments" | "id"))
    {
        return Expect::Error("GenericError");
    }
    let Some(name) = obj.get("execute").and_then(Value::as_str) else {
        return Expect::Error("GenericError");
    };
    let empty = Map::new();
    let args = match obj.get("arguments") {
        None => &empty,
        Some(Value::Object(a)) => a,
        Some(_) => return Expect::Error("GenericError"),
    };
    let is_int = |v: Option<&Value>| v.is_some_and(|v| v.is_i64());
    let keys: Vec<&str> = args.keys().map(String::as_str).collect();
    let caps_ok = keys.is_empty() || (keys == ["enable"] && args["enable"] == json!([]));
    let caps_valid_args = keys.is_empty()
        || (keys == ["enable"]
            && args["enable"]
                .as_array()
                .is_some_and(|a| a.iter().all(|x| x == "oob")));
    if !*negotiated {
        if name != "qmp_capabilities" {
            return Expect::Error("CommandNotFound");
        }
        if caps_ok {
            *negotiated = true;
            return Expect::Return(json!({}));
        }
        return Expect::Error("GenericError");
    }
    match name {
        "qmp_capabilities" if caps_valid_args => Expect::Error("CommandNotFound"),
        "qmp_capabilities" => Expect::Error("GenericError"),
        "x-add" => {
            if keys == ["a", "b"] && is_int(args.get("a")) && is_int(args.get("b")) {
                let a = args["a"].as_i64().unwrap_or(0);
                let b = args["b"].as_i64().unwrap_or(0);
                Expect::Return(json!(a.wrapping_add(b)))
            } else {
                Expect::Error("GenericError")
            }
        }
        "x-fail" => {
            if keys == ["device"] && args["device"].is_string() {
                Expect::Error("DeviceNotFound")
            } else {
                Expect::Error("GenericError")
            }
        }
        "query-version" if keys.is_empty() => Expect::Return(version.clone()),
        "query-commands" if keys.is_empty() => Expect::Return(commands.clone()),
        "query-version" | "query-commands" => Expect::Error("GenericError"),
        _ => Expect::Error("CommandNotFound"),
    }
}

fn encode(reqs: &[Value], seps: &[u8]) -> Vec<u8> {
    let ws: [&[u8]; 4] = [b" ", b"\n", b"\r\n", b"\t "];
    let mut bytes = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        bytes.extend_from_slice(r.to_string().as_bytes());
        let s = seps.get(i).copied().unwrap_or(0) as usize % ws.len();
        bytes.extend_from_slice(ws[s]);
    }
    bytes
}

proptest! {
    #[test]
    fn random_bytes_never_break_the_session(
        junk in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(1usize..64, 0..8),
        negotiate_first in any::<bool>(),
    ) {
        let probe = Arc::new(Probe::default());
        let mut s = session(&probe);
        if negotiate_first {
            let mut o = Vec::new();
            s.feed(b"{\"execute\": \"qmp_capabilities\"}", &mut o);
            prop_assert_eq!(o, vec![json!({"return": {}})]);
        }
        let out = feed_chunks(&mut s, &junk, &cuts);
        for r in &out {
            let o = r.as_object().expect("replies are objects");
            prop_assert!(o.contains_key("return") ^ o.contains_key("error"), "{}", r);
        }
        prop_assume!(!s.quit_requested());
        // QMP's reset: a control character, then a fresh request is served.
        let mut out = Vec::new();
        s.feed(b"\x01\n{\"execute\": \"qmp_capabilities\", \"id\": \"final\"}", &mut out);
        let last = out.last().expect("the final request is answered");
        prop_assert_eq!(&last["id"], &json!("final"));
        let extra = out.iter().filter(|r| r.get("id") == Some(&json!("final"))).count();
        prop_assert_eq!(extra, 1);
    }

    #[test]
    fn every_request_gets_exactly_one_answer(
        reqs in prop::collection::vec(request(), 0..24),
        seps in prop::collection::vec(any::<u8>(), 24),
        cuts in prop::collection::vec(1usize..48, 0..12),
        negotiate_first in any::<bool>(),
    ) {
        let probe = Arc::new(Probe::default());
        let mut s = session(&probe);
        let version = json!({"qemu": {"micro": 0, "minor": 2, "major": 9},
            "package": format!("blockrep {}", env!("CARGO_PKG_VERSION"))});
        let commands = json!(["qmp_capabilities", "query-commands", "query-version", "quit",
            "x-add", "x-echo", "x-emit", "x-fail"].iter().map(|n| json!({"name": n})).collect::<Vec<_>>());
        let mut negotiated = false;
        let mut all = reqs.clone();
        if negotiate_first {
            all.insert(0, json!({"execute": "qmp_capabilities"}));
        }
        let bytes = encode(&all, &seps);
        let out = feed_chunks(&mut s, &bytes, &cuts);
        prop_assert_eq!(out.len(), all.len(), "one answer per request");
        for (req, rep) in all.iter().zip(&out) {
            let want = model(req, &mut negotiated, &version, &commands);
            match (&want, rep.get("return"), rep.get("error")) {
                (Expect::Return(v), Some(r), None) => prop_assert_eq!(v, r, "{} -> {}", req, rep),
                (Expect::Error(class), None, Some(e)) => {
                    prop_assert_eq!(&e["class"], &json!(class), "{} -> {}", req, rep);
                    prop_assert!(e["desc"].as_str().is_some_and(|d| !d.is_empty()));
                }
                _ => prop_assert!(false, "{} -> {} (want {:?})", req, rep, want),
            }
            let id = req.as_object().and_then(|o| o.get("id"));
            prop_assert_eq!(rep.get("id"), id, "id echo for {}", req);
        }
        prop_assert_eq!(s.negotiated(), negotiated);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// The socket server answers byte streams exactly as a bare session.
    #[test]
    fn socket_server_matches_session(
        reqs in prop::collection::vec(request(), 1..16),
        seps in prop::collection::vec(any::<u8>(), 16),
    ) {
        let probe = Arc::new(Probe::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let server = Server::start(demo_registry(Arc::clone(&probe)), ServerConfig::unix(&path)).unwrap();
        let mut all = vec![json!({"execute": "qmp_capabilities"})];
        all.extend(reqs);
        let bytes = encode(&all, &seps);
        let mut expected = Vec::new();
        session(&Arc::new(Probe::default())).feed(&bytes, &mut expected);

        let mut c = Client::connect(&path);
        let _greeting = c.recv();
        c.send_raw(&bytes);
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            got.push(c.recv());
        }
        prop_assert_eq!(got, expected);
        // Still alive and responsive.
        prop_assert_eq!(
            c.cmd(json!({"execute": "x-add", "arguments": {"a": 1, "b": 2}, "id": "end"})),
            json!({"return": 3, "id": "end"})
        );
        prop_assert!(probe.max_seen.load(Ordering::SeqCst) <= 1);
        drop(c);
        server.join();
    }
}

/// Rewrites standard JSON text with QEMU's single-quoted strings.
fn single_quoted(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        match (in_str, c) {
            (false, '"') | (true, '"') => {
                in_str = !in_str;
                out.push('\'');
            }
            (true, '\\') => {
                let n = chars.next().unwrap_or('\\');
                if n == '"' {
                    out.push('"');
                } else {
                    out.push('\\');
                    out.push(n);
                }
            }
            (true, '\'') => out.push_str("\\'"),
            _ => out.push(c),
        }
    }
    out
}

proptest! {
    /// The splitter returns exactly the values sent, however the stream is
    /// cut, with double or single quotes.
    #[test]
    fn splitter_returns_what_was_sent(
        vals in prop::collection::vec(json_value(), 0..12),
        quotes in prop::collection::vec(any::<bool>(), 12),
        seps in prop::collection::vec(any::<u8>(), 12),
        cuts in prop::collection::vec(1usize..32, 0..16),
    ) {
        let ws: [&str; 4] = [" ", "\n", "\r\n", "\t"];
        let mut text = String::new();
        for (i, v) in vals.iter().enumerate() {
            let s = v.to_string();
            text.push_str(&if quotes[i] { single_quoted(&s) } else { s });
            text.push_str(ws[seps[i] as usize % 4]);
        }
        let bytes = text.as_bytes();
        let mut sp = qmp::json::Splitter::new();
        let mut out = Vec::new();
        let mut at = 0;
        for c in &cuts {
            let end = (at + c).min(bytes.len());
            sp.feed(&bytes[at..end], &mut out);
            at = end;
        }
        sp.feed(&bytes[at..], &mut out);
        let got: Vec<Value> = out.into_iter().collect::<Result<_, _>>().map_err(TestCaseError::fail)?;
        prop_assert_eq!(got, vals);
        prop_assert!(sp.is_idle());
    }
}
