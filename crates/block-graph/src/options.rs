//! Typed access to a driver's options (a JSON map in QEMU's `blockdev-add` shape)
//! with clear errors, and helpers for node names and backing file names.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Backing chains deeper than this are refused (a guard against loops in image
/// headers and runaway recursion).
pub const MAX_BACKING_DEPTH: usize = 64;

/// The options of one driver, taken key by key. Every `take_*` removes the key;
/// [`OptionMap::finish`] refuses whatever is left ("does not support the option").
/// Every error is [`crate::ErrorKind::InvalidArgument`] and names the driver and the option.
#[derive(Debug, Clone)]
pub struct OptionMap {
    driver: String,
    map: Map<String, Value>,
}

impl OptionMap {
    /// Wraps a map of options for `driver`.
    pub fn new(driver: impl Into<String>, map: Map<String, Value>) -> OptionMap {
        OptionMap {
            driver: driver.into(),
            map,
        }
    }

    /// Builds from a JSON value that must be an object.
    pub fn from_value(driver: impl Into<String>, value: &Value) -> Result<OptionMap> {
        let driver = driver.into();
        match value {
            Value::Object(m) => Ok(OptionMap {
                driver,
                map: m.clone(),
            }),
            other => Err(Error::invalid(format!(
                "options for driver '{driver}' must be an object, got {}",
                type_name(other)
            ))),
        }
    }

    /// The driver these options belong to.
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// True if `key` is present (not taken).
    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Removes and returns a raw value.
    pub fn take_value(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    /// The error for a missing required option.
    pub fn missing(&self, key: &str) -> Error {
        Error::invalid(format!(
            "driver '{}' requires the option '{key}'",
            self.driver
        ))
    }

    fn wrong_type(&self, key: &str, want: &str, got: &Value) -> Error {
        Error::invalid(format!(
            "driver '{}': option '{key}' expects {want}, got {} ({got})",
            self.driver,
            type_name(got)
        ))
    }

    /// Takes an unsigned integer (a JSON number, or a string of decimal digits).
    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<u64>().map(Some).map_err(|_| {
                    self.wrong_type(key, "an unsigned integer", &Value::String(s.clone()))
                })
            }
            Some(v) => Err(self.wrong_type(key, "an unsigned integer", &v)),
        }
    }

    /// Takes a signed integer.
    pub fn take_i64(&mut self, key: &str) -> Result<Option<i64>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64()),
            Some(v) => Err(self.wrong_type(key, "an integer", &v)),
        }
    }

    /// Takes a required unsigned integer.
    pub fn require_u64(&mut self, key: &str) -> Result<u64> {
        self.take_u64(key)?.ok_or_else(|| self.missing(key))
    }

    /// Takes a boolean (JSON bool, or the strings "on"/"off"/"true"/"false").
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if s == "on" || s == "true" => Ok(Some(true)),
            Some(Value::String(s)) if s == "off" || s == "false" => Ok(Some(false)),
            Some(v) => Err(self.wrong_type(key, "a boolean", &v)),
        }
    }

    /// Takes a string.
    pub fn take_str(&mut self, key: &str) -> Result<Option<String>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "a string", &v)),
        }
    }

    /// Takes a required string.
    pub fn require_str(&mut self, key: &str) -> Result<String> {
        self.take_str(key)?.ok_or_else(|| self.missing(key))
    }

    /// Takes a string that must be one of `allowed` (the error lists them).
    pub fn take_enum(&mut self, key: &str, allowed: &[&str]) -> Result<Option<String>> {
        match self.take_str(key)? {
            None => Ok(None),
            Some(s) if allowed.contains(&s.as_str()) => Ok(Some(s)),
            Some(s) => Err(Error::invalid(format!(
                "driver '{}': option '{key}' must be one of {}, got '{s}'",
                self.driver,
                allowed
                    .iter()
                    .map(|a| format!("'{a}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Takes a list.
    pub fn take_list(&mut self, key: &str) -> Result<Option<Vec<Value>>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong_type(key, "a list", &v)),
        }
    }

    /// Takes a nested object as its own option map (errors name `driver.key`).
    pub fn take_object(&mut self, key: &str) -> Result<Option<OptionMap>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(OptionMap {
                driver: format!("{}' option '{key}", self.driver),
                map: m,
            })),
            Some(v) => Err(self.wrong_type(key, "an object", &v)),
        }
    }

    /// Refuses any option that was not taken.
    pub fn finish(self) -> Result<()> {
        if let Some(k) = self.map.keys().next() {
            return Err(Error::invalid(format!(
                "driver '{}' does not support the option '{k}'",
                self.driver
            )));
        }
        Ok(())
    }

    /// The keys not yet taken.
    pub fn remaining_keys(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Checks a user-given node name the way QEMU does: 1..=31 characters, starting
/// with a letter, then letters, digits, `-`, `.`, `_`. (Generated names start
/// with `#` so they never clash with user names.)
pub fn validate_node_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 31
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid node-name '{name}': use 1 to 31 letters, digits, '-', '.', '_', starting with a letter"
        )))
    }
}

/// Resolves a backing file name stored in an image against the image's own path,
/// as QEMU does: absolute names and protocol names (`nbd:...`, `nbd+unix://...`,
/// `json:{...}`) stay as they are; a relative name is relative to the directory
/// holding the image (not to the current directory).
pub fn resolve_backing_path(image_path: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() || is_protocol_name(backing) {
        return b.to_path_buf();
    }
    match image_path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}

fn is_protocol_name(name: &str) -> bool {
    match name.find(':') {
        Some(i) => {
            let p = &name[..i];
            !p.is_empty()
                && !p.contains('/')
                && p.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'-' || c == b'.')
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn om(v: Value) -> OptionMap {
        OptionMap::from_value("memory", &v).unwrap()
    }

    #[test]
    fn typed_takes_and_errors_name_option_and_driver() {
        let mut m = om(json!({"size": 4096, "s": "1024", "b": "on", "x": "abc", "e": "fifo"}));
        assert_eq!(m.take_u64("size").unwrap(), Some(4096));
        assert_eq!(m.take_u64("s").unwrap(), Some(1024));
        assert_eq!(m.take_bool("b").unwrap(), Some(true));
        let e = m.take_u64("x").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        assert!(
            e.to_string().contains("'x'") && e.to_string().contains("memory"),
            "{e}"
        );
        let e = m.clone().take_enum("e", &["quorum"]).unwrap_err();
        assert!(e.to_string().contains("'quorum'"), "{e}");
        assert_eq!(
            m.take_enum("e", &["quorum", "fifo"]).unwrap().as_deref(),
            Some("fifo")
        );
        assert_eq!(m.take_u64("absent").unwrap(), None);
        let e = m.clone().require_u64("size").unwrap_err();
        assert!(e.to_string().contains("requires the option 'size'"), "{e}");
        m.finish().unwrap();
        let e = om(json!({"bogus": 1})).finish().unwrap_err();
        assert!(
            e.to_string()
                .contains("does not support the option 'bogus'"),
            "{e}"
        );
    }

    #[test]
    fn node_names() {
        validate_node_name("disk0").unwrap();
        validate_node_name("a.b-c_d").unwrap();
        for bad in ["", "0disk", "#block1", "a b", "x".repeat(32).as_str()] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backing_paths_resolve_against_image_dir() {
        let img = Path::new("/images/vm/top.qcow2");
        assert_eq!(
            resolve_backing_path(img, "base.qcow2"),
            Path::new("/images/vm/base.qcow2")
        );
        assert_eq!(
            resolve_backing_path(img, "../b/base.img"),
            Path::new("/images/vm/../b/base.img")
        );
        assert_eq!(
            resolve_backing_path(img, "/abs/base"),
            Path::new("/abs/base")
        );
        assert_eq!(
            resolve_backing_path(img, "nbd://host:10809/x"),
            Path::new("nbd://host:10809/x")
        );
        assert_eq!(
            resolve_backing_path(Path::new("top.qcow2"), "b.img"),
            Path::new("b.img")
        );
    }
}
