//! The command registry: commands by name, each with a QAPI argument schema
//! and a handler; plus the version reported in the greeting.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use crate::error::{Error, QmpError};
use crate::events::EventEmitter;
use crate::json::parse_all_lenient;
use crate::schema::{parse_members, parse_typeref, Path, Schema, TypeRef};

/// The version in the greeting and in `query-version`, shaped as QEMU's
/// `VersionInfo` so that QEMU's clients parse it.
///
/// `qemu` is the QEMU release whose QMP command shapes we follow (clients
/// gate features on it), `package` names our program and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// QEMU-like major version.
    pub major: u64,
    /// QEMU-like minor version.
    pub minor: u64,
    /// QEMU-like micro version.
    pub micro: u64,
    /// Free-form package string: ours, e.g. `"blockrep 0.1.0"`.
    pub package: String,
}

impl Default for VersionInfo {
    /// QEMU 9.2.0 shapes (the `qapi/*.json` we follow); package
    /// `"blockrep <this crate's version>"`.
    fn default() -> Self {
        VersionInfo {
            major: 9,
            minor: 2,
            micro: 0,
            package: format!("blockrep {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl VersionInfo {
    /// `{"qemu": {"micro": .., "minor": .., "major": ..}, "package": ..}`.
    pub fn to_json(&self) -> Value {
        json!({
            "qemu": {"micro": self.micro, "minor": self.minor, "major": self.major},
            "package": self.package,
        })
    }
}

/// A command's arguments, already checked against its schema.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Args {
    map: Map<String, Value>,
}

impl Args {
    /// Wraps an arguments object (used by tests and by [`crate::Session`]).
    pub fn new(map: Map<String, Value>) -> Self {
        Args { map }
    }

    /// The raw member, if present.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name)
    }

    /// True if the member is present.
    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// All members.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.map
    }

    /// The arguments as one JSON object.
    pub fn to_value(&self) -> Value {
        Value::Object(self.map.clone())
    }

    fn need(&self, name: &str) -> Result<&Value, QmpError> {
        self.map.get(name).ok_or_else(|| QmpError::missing(name))
    }

    /// A required string member.
    pub fn str(&self, name: &str) -> Result<&str, QmpError> {
        self.need(name)?
            .as_str()
            .ok_or_else(|| QmpError::invalid_type(name, "string"))
    }

    /// An optional string member.
    pub fn opt_str(&self, name: &str) -> Option<&str> {
        self.map.get(name).and_then(Value::as_str)
    }

    /// A required unsigned integer member.
    pub fn u64(&self, name: &str) -> Result<u64, QmpError> {
        self.need(name)?
            .as_u64()
            .ok_or_else(|| QmpError::invalid_type(name, "integer"))
    }

    /// An optional unsigned integer member.
    pub fn opt_u64(&self, name: &str) -> Option<u64> {
        self.map.get(name).and_then(Value::as_u64)
    }

    /// A required signed integer member.
    pub fn i64(&self, name: &str) -> Result<i64, QmpError> {
        self.need(name)?
            .as_i64()
            .ok_or_else(|| QmpError::invalid_type(name, "integer"))
    }

    /// An optional signed integer member.
    pub fn opt_i64(&self, name: &str) -> Option<i64> {
        self.map.get(name).and_then(Value::as_i64)
    }

    /// A required boolean member.
    pub fn bool(&self, name: &str) -> Result<bool, QmpError> {
        self.need(name)?
            .as_bool()
            .ok_or_else(|| QmpError::invalid_type(name, "boolean"))
    }

    /// An optional boolean member.
    pub fn opt_bool(&self, name: &str) -> Option<bool> {
        self.map.get(name).and_then(Value::as_bool)
    }

    /// Deserialises the arguments into a typed struct (use
    /// `#[serde(rename_all = "kebab-case")]` for QEMU's member names).
    /// The schema has already vetted them, so a failure here means the
    /// struct and the schema disagree; it is reported as a `GenericError`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, QmpError> {
        serde_json::from_value(Value::Object(self.map.clone())).map_err(|e| {
            QmpError::generic(format!(
                "internal error: arguments do not match the handler: {e}"
            ))
        })
    }
}

/// The signature of a command handler.
pub type Handler = dyn Fn(&Args) -> Result<Value, QmpError> + Send + Sync;

#[derive(Clone)]
pub(crate) enum Action {
    User(Arc<Handler>),
    Capabilities,
    QueryCommands,
    QueryVersion,
    Quit,
}

#[derive(Clone)]
pub(crate) struct Command {
    pub(crate) args: Option<TypeRef>,
    pub(crate) action: Action,
}

/// Commands by name, with argument schemas, the version and the event
/// emitter. Built before the server starts, then shared read-only.
///
/// Built in: `qmp_capabilities`, `query-commands`, `query-version`, `quit`.
pub struct Registry {
    schema: Schema,
    commands: BTreeMap<String, Command>,
    version: VersionInfo,
    events: EventEmitter,
    quit_hook: Option<Arc<dyn Fn() + Send + Sync>>,
    lock: Arc<Mutex<()>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("commands", &self.commands.keys().collect::<Vec<_>>())
            .field("version", &self.version)
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry holding only the built-in commands, with the default version.
    pub fn new() -> Self {
        Self::with_version(VersionInfo::default())
    }

    /// A registry holding only the built-in commands.
    pub fn with_version(version: VersionInfo) -> Self {
        let mut schema = Schema::new();
        // Infallible: a fixed, valid definition.
        let _ = schema.define("{'enum': 'QMPCapability', 'data': ['oob']}");
        let mut r = Registry {
            schema,
            commands: BTreeMap::new(),
            version,
            events: EventEmitter::new(),
            quit_hook: None,
            lock: Arc::new(Mutex::new(())),
        };
        let builtins = [
            (
                "qmp_capabilities",
                "{'*enable': ['QMPCapability']}",
                Action::Capabilities,
            ),
            ("query-commands", "", Action::QueryCommands),
            ("query-version", "", Action::QueryVersion),
            ("quit", "", Action::Quit),
        ];
        for (name, args, action) in builtins {
            let _ = r.add(name, args, action);
        }
        r
    }

    /// The version reported in the greeting and by `query-version`.
    pub fn version(&self) -> &VersionInfo {
        &self.version
    }

    /// The dispatcher lock: every handler runs with it held, one at a
    /// time, as QEMU runs commands in its main loop. Other threads that
    /// change what handlers look at (the block graph) can take it too.
    pub fn dispatch_lock(&self) -> &Arc<Mutex<()>> {
        &self.lock
    }

    /// The event emitter clients of a server on this registry listen to.
    pub fn events(&self) -> EventEmitter {
        self.events.clone()
    }

    /// Runs `hook` when a client executes `quit`, before the reply is sent
    /// (with the dispatcher lock held). The server then shuts down.
    pub fn on_quit(&mut self, hook: impl Fn() + Send + Sync + 'static) {
        self.quit_hook = Some(Arc::new(hook));
    }

    pub(crate) fn quit_hook(&self) -> Option<&Arc<dyn Fn() + Send + Sync>> {
        self.quit_hook.as_ref()
    }

    /// Defines named types (structs, enums, unions, alternates) in QAPI
    /// syntax for use in command argument schemas.
    pub fn define(&mut self, qapi: &str) -> Result<(), Error> {
        self.schema.define(qapi)
    }

    /// The schema of named types.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Registers a command.
    ///
    /// `args` is the command's QAPI `data`: `""` for no arguments, an
    /// object of members such as `"{'device': 'str', '*writable': 'bool'}"`,
    /// or a quoted type name such as `"'BlockdevOptions'"` (QEMU's boxed
    /// commands). Arguments are checked against it before `handler` runs;
    /// the handler returns the `return` value (`json!({})` for none).
    pub fn register<F>(&mut self, name: &str, args: &str, handler: F) -> Result<(), Error>
    where
        F: Fn(&Args) -> Result<Value, QmpError> + Send + Sync + 'static,
    {
        self.add(name, args, Action::User(Arc::new(handler)))
    }

    fn add(&mut self, name: &str, args: &str, action: Action) -> Result<(), Error> {
        if self.commands.contains_key(name) {
            return Err(Error::DuplicateCommand {
                name: name.to_string(),
            });
        }
        let args = if args.trim().is_empty() {
            None
        } else {
            let vals = parse_all_lenient(args).map_err(|e| Error::schema(name, e))?;
            let [v] = vals.as_slice() else {
                return Err(Error::schema(
                    name,
                    "arguments must be one object or one type name",
                ));
            };
            match v {
                Value::Object(_) => {
                    let members = parse_members(name, v)?;
                    let anon = format!("q_obj_{name}-arg");
                    self.schema.insert_anonymous(&anon, members)?;
                    Some(TypeRef::Named(anon))
                }
                Value::String(_) => {
                    let t = parse_typeref(name, v)?;
                    self.schema.check_ref(name, &t)?;
                    if !matches!(t, TypeRef::Named(_)) {
                        return Err(Error::schema(
                            name,
                            "arguments type must be a struct or union",
                        ));
                    }
                    Some(t)
                }
                _ => {
                    return Err(Error::schema(
                        name,
                        "arguments must be an object or a type name",
                    ))
                }
            }
        };
        self.commands
            .insert(name.to_string(), Command { args, action });
        Ok(())
    }

    /// Runs a command in-process as a negotiated client would: arguments
    /// (an object, or `null` for none) checked first, then the handler
    /// under the dispatcher lock (checking recurses over the nesting of
    /// `arguments`; see [`crate::Session`] on stack size). For scripted set-ups and tests;
    /// `qmp_capabilities` and `quit` belong to a connection and are refused.
    pub fn execute(&self, name: &str, arguments: Value) -> Result<Value, QmpError> {
        let args = match arguments {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            _ => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
        };
        let cmd = self.command(name).ok_or_else(|| {
            QmpError::command_not_found(format!("The command {name} has not been found"))
        })?;
        self.check_command_args(cmd, &args)?;
        match &cmd.action {
            Action::User(h) => self.call(name, h, Args::new(args)),
            Action::QueryCommands => Ok(self.query_commands()),
            Action::QueryVersion => Ok(self.version.to_json()),
            Action::Capabilities | Action::Quit => Err(QmpError::generic(format!(
                "The command {name} is only available on a QMP connection"
            ))),
        }
    }

    /// Runs a handler under the dispatcher lock. A panicking handler is a
    /// bug, but must not take the connection (or the lock) down with it:
    /// the client gets a `GenericError` and the server keeps serving.
    pub(crate) fn call(&self, name: &str, h: &Arc<Handler>, args: Args) -> Result<Value, QmpError> {
        let _g = self.lock.lock();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h(&args))).unwrap_or_else(|_| {
            Err(QmpError::generic(format!(
                "internal error: command {name} failed unexpectedly"
            )))
        })
    }

    /// The `query-commands` reply: `[{"name": ...}, ...]`, sorted.
    pub fn query_commands(&self) -> Value {
        Value::Array(self.commands.keys().map(|n| json!({ "name": n })).collect())
    }

    /// Names of every command, sorted.
    pub fn command_names(&self) -> Vec<&str> {
        self.commands.keys().map(String::as_str).collect()
    }

    pub(crate) fn command(&self, name: &str) -> Option<&Command> {
        self.commands.get(name)
    }

    /// Checks `arguments` for command `name` as the dispatcher does, without
    /// running anything. `Ok` means the handler would be called.
    pub fn check_args(&self, name: &str, arguments: &Map<String, Value>) -> Result<(), QmpError> {
        let cmd = self.command(name).ok_or_else(|| {
            QmpError::command_not_found(format!("The command {name} has not been found"))
        })?;
        self.check_command_args(cmd, arguments)
    }

    pub(crate) fn check_command_args(
        &self,
        cmd: &Command,
        arguments: &Map<String, Value>,
    ) -> Result<(), QmpError> {
        match &cmd.args {
            None => match arguments.keys().next() {
                Some(k) => Err(QmpError::unexpected(k)),
                None => Ok(()),
            },
            Some(t) => {
                // The arguments object itself is the struct; its members are
                // named without a prefix, as in QEMU.
                let v = Value::Object(arguments.clone());
                self.schema.check(t, &v, &mut Path::default())
            }
        }
    }
}
