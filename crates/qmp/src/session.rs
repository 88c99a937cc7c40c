//! One client's protocol state, without any I/O: bytes in, messages out.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::error::{ErrorClass, QmpError};
use crate::json::{Piece, Splitter};
use crate::registry::{Action, Args, Registry};

/// QEMU's message for any command but `qmp_capabilities` before negotiation.
pub const NEGOTIATION_EXPECTED: &str = "Expecting capabilities negotiation with 'qmp_capabilities'";
/// QEMU's message for `qmp_capabilities` after negotiation.
pub const NEGOTIATION_DONE: &str = "Capabilities negotiation is already complete, command ignored";

/// One QMP conversation: the splitter, the negotiation state, dispatch.
///
/// The server runs one per connection; tests (and the daemon's tests) can
/// drive it directly with [`Session::feed`]. Parsing and checking recurse
/// over the input's nesting (up to QEMU's 1024 levels): a caller that may
/// get input that deep needs a big thread stack, as the server's client
/// threads have (16 MiB; a 2 MiB thread overflows near 1000 levels in a
/// debug build).
pub struct Session {
    registry: Arc<Registry>,
    splitter: Splitter,
    negotiated: bool,
    quit: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("negotiated", &self.negotiated)
            .field("quit", &self.quit)
            .finish()
    }
}

/// An error response (with `id` when the request had one).
pub fn error_response(err: &QmpError, id: Option<&Value>) -> Value {
    let mut m = Map::new();
    m.insert("error".to_string(), err.to_json());
    if let Some(id) = id {
        m.insert("id".to_string(), id.clone());
    }
    Value::Object(m)
}

fn return_response(ret: Value, id: Option<&Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".to_string(), ret);
    if let Some(id) = id {
        m.insert("id".to_string(), id.clone());
    }
    Value::Object(m)
}

impl Session {
    /// A fresh session in capabilities-negotiation mode. Handlers run with
    /// the registry's dispatcher lock held ([`Registry::dispatch_lock`]).
    pub fn new(registry: Arc<Registry>) -> Self {
        Session {
            registry,
            splitter: Splitter::new(),
            negotiated: false,
            quit: false,
        }
    }

    /// The greeting sent when a client connects.
    pub fn greeting(&self) -> Value {
        json!({"QMP": {"version": self.registry.version().to_json(), "capabilities": []}})
    }

    /// True once `qmp_capabilities` succeeded (events are delivered).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// True once `quit` was executed; the connection should close after the
    /// reply is written.
    pub fn quit_requested(&self) -> bool {
        self.quit
    }

    /// Feeds bytes from the client; every reply is appended to `out`, one
    /// per complete JSON value (or parse error) in the input. Stops early
    /// after `quit` (the rest is ignored, as QEMU exits).
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Value>) {
        self.feed_each(bytes, |r, _| {
            out.push(r);
            true
        });
    }

    /// Like [`Session::feed`], but hands over each reply as soon as it is
    /// made, with whether the session is negotiated after it (so a server
    /// can start delivering events exactly after the `qmp_capabilities`
    /// reply). `on_reply` returns false to stop; later requests in `bytes`
    /// are then dropped.
    pub fn feed_each(&mut self, bytes: &[u8], mut on_reply: impl FnMut(Value, bool) -> bool) {
        let mut pieces: Vec<Piece> = Vec::new();
        self.splitter.feed(bytes, &mut pieces);
        for p in pieces {
            if self.quit {
                break;
            }
            let reply = match p {
                Ok(v) => self.handle(v),
                Err(desc) => error_response(&QmpError::generic(desc), None),
            };
            if !on_reply(reply, self.negotiated) {
                break;
            }
        }
    }

    /// Handles one parsed request and returns its reply.
    pub fn handle(&mut self, req: Value) -> Value {
        let Value::Object(obj) = req else {
            return error_response(&QmpError::generic("QMP input must be a JSON object"), None);
        };
        let id = obj.get("id");
        match self.dispatch(&obj) {
            Ok(ret) => return_response(ret, id),
            Err(e) => error_response(&e, id),
        }
    }

    fn dispatch(&mut self, obj: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut name = None;
        for (k, v) in obj {
            match k.as_str() {
                "execute" => match v.as_str() {
                    Some(s) => name = Some(s),
                    None => {
                        return Err(QmpError::generic(
                            "QMP input member 'execute' must be a string",
                        ))
                    }
                },
                "arguments" => {
                    if !v.is_object() {
                        return Err(QmpError::generic(
                            "QMP input member 'arguments' must be an object",
                        ));
                    }
                }
                "id" => {}
                // exec-oob too: OOB is never offered, so it is unexpected.
                other => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{other}' is unexpected"
                    )));
                }
            }
        }
        let Some(name) = name else {
            return Err(QmpError::generic("QMP input lacks member 'execute'"));
        };
        let empty = Map::new();
        let arguments = obj
            .get("arguments")
            .and_then(Value::as_object)
            .unwrap_or(&empty);

        let cmd = match self.registry.command(name) {
            Some(c) if self.negotiated || matches!(c.action, Action::Capabilities) => c,
            _ if !self.negotiated => return Err(QmpError::command_not_found(NEGOTIATION_EXPECTED)),
            _ => {
                return Err(QmpError::command_not_found(format!(
                    "The command {name} has not been found"
                )))
            }
        };
        self.registry.check_command_args(cmd, arguments)?;
        match &cmd.action {
            Action::Capabilities => {
                if self.negotiated {
                    return Err(QmpError::new(ErrorClass::CommandNotFound, NEGOTIATION_DONE));
                }
                // No capability is ever offered: any requested one is
                // refused, listed as QEMU lists them.
                let asked: Vec<&str> = arguments
                    .get("enable")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if !asked.is_empty() {
                    return Err(QmpError::generic(format!(
                        "Capability {} not available",
                        asked.join(", ")
                    )));
                }
                self.negotiated = true;
                Ok(json!({}))
            }
            Action::QueryCommands => Ok(self.registry.query_commands()),
            Action::QueryVersion => Ok(self.registry.version().to_json()),
            Action::Quit => {
                if let Some(h) = self.registry.quit_hook() {
                    let _g = self.registry.dispatch_lock().lock();
                    h();
                }
                self.quit = true;
                Ok(json!({}))
            }
            Action::User(h) => self.registry.call(name, h, Args::new(arguments.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.define("{'enum': 'Mode', 'data': ['primary', 'secondary']}")
            .unwrap();
        r.register("echo", "{'s': 'str', '*n': 'int', '*mode': 'Mode'}", |a| {
            Ok(json!({"s": a.str("s")?, "n": a.opt_i64("n")}))
        })
        .unwrap();
        r.register("fail", "", |_| {
            Err(QmpError::device_not_found("Device 'x' not found"))
        })
        .unwrap();
        r
    }

    fn session() -> Session {
        Session::new(Arc::new(registry()))
    }

    fn run(s: &mut Session, input: &str) -> Vec<Value> {
        let mut out = Vec::new();
        s.feed(input.as_bytes(), &mut out);
        out
    }

    fn negotiated() -> Session {
        let mut s = session();
        assert_eq!(
            run(&mut s, r#"{"execute": "qmp_capabilities"}"#),
            vec![json!({"return": {}})]
        );
        s
    }

    fn err(class: &str, desc: &str) -> Value {
        json!({"error": {"class": class, "desc": desc}})
    }

    fn err_id(class: &str, desc: &str, id: Value) -> Value {
        json!({"error": {"class": class, "desc": desc}, "id": id})
    }

    #[test]
    fn greeting_shape() {
        let s = session();
        let g = s.greeting();
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        assert_eq!(
            g["QMP"]["version"]["qemu"],
            json!({"major": 9, "minor": 2, "micro": 0})
        );
        assert!(g["QMP"]["version"]["package"]
            .as_str()
            .unwrap()
            .starts_with("blockrep "));
    }

    #[test]
    fn negotiation_gate() {
        let mut s = session();
        assert_eq!(
            run(
                &mut s,
                r#"{"execute": "echo", "arguments": {"s": "x"}, "id": 1}"#
            ),
            vec![err_id("CommandNotFound", NEGOTIATION_EXPECTED, json!(1))]
        );
        assert_eq!(
            run(&mut s, r#"{"execute": "no-such"}"#),
            vec![err("CommandNotFound", NEGOTIATION_EXPECTED)]
        );
        // Structural errors keep their own wording before negotiation too.
        assert_eq!(
            run(&mut s, r#"{"arguments": {}}"#),
            vec![err("GenericError", "QMP input lacks member 'execute'")]
        );
        assert_eq!(
            run(
                &mut s,
                r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#
            ),
            vec![err("GenericError", "Capability oob not available")]
        );
        assert_eq!(
            run(
                &mut s,
                r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}"#
            ),
            vec![err(
                "GenericError",
                "Parameter 'enable[0]' does not accept value 'x'"
            )]
        );
        assert!(!s.negotiated());
        assert_eq!(
            run(
                &mut s,
                r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "a"}"#
            ),
            vec![json!({"return": {}, "id": "a"})]
        );
        assert!(s.negotiated());
        assert_eq!(
            run(&mut s, r#"{"execute": "qmp_capabilities", "id": 2}"#),
            vec![err_id("CommandNotFound", NEGOTIATION_DONE, json!(2))]
        );
    }

    #[test]
    fn id_echo_any_json() {
        let mut s = negotiated();
        for id in [
            json!(1),
            json!("x"),
            json!({"a": [1, null]}),
            json!(null),
            json!(1.5),
        ] {
            let req = json!({"execute": "echo", "arguments": {"s": "v"}, "id": id});
            assert_eq!(
                run(&mut s, &req.to_string()),
                vec![json!({"return": {"s": "v", "n": null}, "id": id})]
            );
            let req = json!({"execute": "fail", "id": id});
            assert_eq!(
                run(&mut s, &req.to_string()),
                vec![err_id("DeviceNotFound", "Device 'x' not found", id.clone())]
            );
        }
    }

    #[test]
    fn request_shape_errors() {
        let mut s = negotiated();
        let cases = [
            (
                "[1]",
                err("GenericError", "QMP input must be a JSON object"),
            ),
            (
                "\"s\"",
                err("GenericError", "QMP input must be a JSON object"),
            ),
            (
                r#"{"id": 7}"#,
                err_id("GenericError", "QMP input lacks member 'execute'", json!(7)),
            ),
            (
                r#"{"execute": "echo", "id": 7, "foo": 1}"#,
                err_id(
                    "GenericError",
                    "QMP input member 'foo' is unexpected",
                    json!(7),
                ),
            ),
            (
                r#"{"exec-oob": "echo", "id": 8}"#,
                err_id(
                    "GenericError",
                    "QMP input member 'exec-oob' is unexpected",
                    json!(8),
                ),
            ),
            (
                r#"{"execute": 1, "id": 9}"#,
                err_id(
                    "GenericError",
                    "QMP input member 'execute' must be a string",
                    json!(9),
                ),
            ),
            (
                r#"{"execute": "echo", "arguments": [], "id": 10}"#,
                err_id(
                    "GenericError",
                    "QMP input member 'arguments' must be an object",
                    json!(10),
                ),
            ),
            (
                r#"{"execute": "nope", "id": 11}"#,
                err_id(
                    "CommandNotFound",
                    "The command nope has not been found",
                    json!(11),
                ),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(run(&mut s, input), vec![want], "{input}");
        }
    }

    #[test]
    fn argument_errors_before_handler() {
        let mut s = negotiated();
        let cases = [
            (r#"{"s": "a", "x": 1}"#, "Parameter 'x' is unexpected"),
            (r#"{}"#, "Parameter 's' is missing"),
            (
                r#"{"s": 1}"#,
                "Invalid parameter type for 's', expected: string",
            ),
            (
                r#"{"s": "a", "n": "1"}"#,
                "Invalid parameter type for 'n', expected: integer",
            ),
            (
                r#"{"s": "a", "mode": "tertiary"}"#,
                "Parameter 'mode' does not accept value 'tertiary'",
            ),
        ];
        for (args, desc) in cases {
            let req = format!(r#"{{"execute": "echo", "arguments": {args}, "id": 1}}"#);
            assert_eq!(
                run(&mut s, &req),
                vec![err_id("GenericError", desc, json!(1))],
                "{args}"
            );
        }
        assert_eq!(
            run(&mut s, r#"{"execute": "fail", "arguments": {"a": 1}}"#),
            vec![err("GenericError", "Parameter 'a' is unexpected")]
        );
    }

    #[test]
    fn malformed_json_keeps_connection_usable() {
        let mut s = negotiated();
        let out = run(
            &mut s,
            "{\"execute\": }\n{\"execute\": \"query-version\", \"id\": 3}",
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["error"]["class"], "GenericError");
        assert!(out[0]["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error, "));
        assert!(out[0].get("id").is_none());
        assert_eq!(out[1]["id"], 3);
        assert_eq!(out[1]["return"]["qemu"]["major"], 9);
    }

    #[test]
    fn builtins() {
        let mut s = negotiated();
        let out = run(&mut s, r#"{"execute": "query-commands"}"#);
        let names: Vec<&str> = out[0]["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            vec![
                "echo",
                "fail",
                "qmp_capabilities",
                "query-commands",
                "query-version",
                "quit"
            ]
        );
        let out = run(&mut s, "{'execute': 'quit'}{'execute': 'query-version'}");
        assert_eq!(out, vec![json!({"return": {}})]);
        assert!(s.quit_requested());
    }

    #[test]
    fn execute_in_process() {
        let r = registry();
        assert_eq!(
            r.execute("echo", json!({"s": "a", "n": 2})),
            Ok(json!({"s": "a", "n": 2}))
        );
        assert_eq!(
            r.execute("echo", json!({"s": 1})).unwrap_err().desc,
            "Invalid parameter type for 's', expected: string"
        );
        assert_eq!(
            r.execute("fail", Value::Null).unwrap_err().class,
            ErrorClass::DeviceNotFound
        );
        assert_eq!(
            r.execute("nope", Value::Null).unwrap_err().class,
            ErrorClass::CommandNotFound
        );
        assert_eq!(
            r.execute("query-version", Value::Null).unwrap()["qemu"]["minor"],
            2
        );
        assert_eq!(
            r.execute("query-commands", Value::Null)
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            6
        );
        assert!(r.execute("quit", Value::Null).is_err());
        assert!(r.execute("echo", json!([])).is_err());
    }

    #[test]
    fn quit_hook_runs() {
        let mut r = registry();
        let hit = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h2 = Arc::clone(&hit);
        r.on_quit(move || {
            h2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let mut s = Session::new(Arc::new(r));
        run(&mut s, "{'execute': 'qmp_capabilities'}");
        assert_eq!(
            run(&mut s, "{'execute': 'quit'}"),
            vec![json!({"return": {}})]
        );
        assert_eq!(hit.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn typed_args() {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "kebab-case")]
        struct A {
            node_name: String,
            read_only: Option<bool>,
        }
        let mut r = Registry::new();
        r.register("t", "{'node-name': 'str', '*read-only': 'bool'}", |a| {
            let a: A = a.parse()?;
            Ok(json!({"n": a.node_name, "ro": a.read_only.unwrap_or(false)}))
        })
        .unwrap();
        let mut s = Session::new(Arc::new(r));
        run(&mut s, "{'execute': 'qmp_capabilities'}");
        assert_eq!(
            run(&mut s, "{'execute': 't', 'arguments': {'node-name': 'n0'}}"),
            vec![json!({"return": {"n": "n0", "ro": false}})]
        );
    }

    #[test]
    fn duplicate_and_bad_registrations() {
        let mut r = registry();
        assert_eq!(
            r.register("echo", "", |_| Ok(json!({})))
                .unwrap_err()
                .kind(),
            crate::ErrorKind::DuplicateCommand
        );
        assert_eq!(
            r.register("x", "'NoSuchType'", |_| Ok(json!({})))
                .unwrap_err()
                .kind(),
            crate::ErrorKind::Schema
        );
        assert_eq!(
            r.register("y", "{'a': 'NoSuchType'}", |_| Ok(json!({})))
                .unwrap_err()
                .kind(),
            crate::ErrorKind::Schema
        );
        assert!(r.command("y").is_none());
    }
}
