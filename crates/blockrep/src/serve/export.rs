//! NBD exports: `nbd-server-start`, `nbd-server-add`, `block-export-add`,
//! `block-export-del`, `query-block-exports`, `nbd-server-remove`,
//! `nbd-server-stop`. Each export is a backend on its node (so the graph
//! knows the node has a user, as replication's secondary disk requires)
//! served by one `nbd::NbdServer`. As in QEMU, every removal of an export
//! (`block-export-del`, `nbd-server-remove`, `nbd-server-stop`) emits
//! `BLOCK_EXPORT_DELETED {id}` once the export is gone (its clients
//! disconnected). Removal is synchronous, so `shutting-down` is always false.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use block_graph::PermPair;
use nbd::blockdev::BackendExport;
use nbd::{ExportOptions, NbdServer, RemoveMode};
use qmp::{Args, QmpError};
use serde_json::{json, Value};

use super::block::{generic, lookup_device};
use super::log::log_at;
use super::Daemon;

/// The running NBD server and its exports.
pub(crate) struct NbdState {
    server: NbdServer,
    unix_path: Option<PathBuf>,
    /// By export id (the export name for `nbd-server-add`).
    exports: BTreeMap<String, ExportEntry>,
}

struct ExportEntry {
    name: String,
    node: String,
    /// Creation order (QEMU lists and closes exports in that order).
    seq: u64,
}

impl NbdState {
    /// Export ids in creation order.
    fn ids_in_order(&self) -> Vec<String> {
        let mut v: Vec<(&String, u64)> = self.exports.iter().map(|(k, e)| (k, e.seq)).collect();
        v.sort_by_key(|(_, s)| *s);
        v.into_iter().map(|(k, _)| k.clone()).collect()
    }
}

/// `nbd-server-start`.
pub(crate) fn nbd_server_start(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    if a.has("tls-creds") || a.has("tls-authz") {
        return Err(QmpError::generic("TLS is not supported by this NBD server"));
    }
    let mut st = d.nbd.lock();
    if st.is_some() {
        return Err(QmpError::generic("NBD server already running"));
    }
    let addr = a.get("addr").cloned().unwrap_or(Value::Null);
    let data = &addr["data"];
    let server = NbdServer::default();
    let mut unix_path = None;
    match addr["type"].as_str() {
        Some("unix") => {
            if data["abstract"].as_bool() == Some(true) {
                return Err(QmpError::generic("abstract Unix sockets are not supported"));
            }
            let path = PathBuf::from(data["path"].as_str().unwrap_or_default());
            server.listen_unix(&path).map_err(|e| {
                QmpError::generic(format!("Failed to bind socket to {}: {e}", path.display()))
            })?;
            unix_path = Some(path);
        }
        Some("inet") => {
            let host = data["host"].as_str().unwrap_or("127.0.0.1");
            let port_s = data["port"].as_str().unwrap_or_default();
            let port: u16 = port_s.parse().map_err(|_| {
                QmpError::generic(format!(
                    "Parameter 'port' expects a port number, got '{port_s}'"
                ))
            })?;
            let bound = server
                .listen_tcp(Some(host), port)
                .map_err(|e| QmpError::generic(format!("Failed to bind socket: {e}")))?;
            log_at!(Info, "NBD server listening on {bound}");
        }
        Some(other) => {
            return Err(QmpError::generic(format!(
                "NBD server address type '{other}' is not supported"
            )))
        }
        None => return Err(QmpError::generic("Parameter 'addr.type' is missing")),
    }
    if let Some(p) = &unix_path {
        log_at!(Info, "NBD server listening on {}", p.display());
    }
    *st = Some(NbdState {
        server,
        unix_path,
        exports: BTreeMap::new(),
    });
    Ok(json!({}))
}

fn add_export(
    d: &Daemon,
    id: &str,
    node_name: &str,
    name: &str,
    writable: bool,
    description: Option<&str>,
) -> Result<Value, QmpError> {
    let mut guard = d.nbd.lock();
    let st = guard
        .as_mut()
        .ok_or_else(|| QmpError::generic("NBD server not running"))?;
    let node = lookup_device(d, node_name)?;
    if st.exports.contains_key(id) {
        return Err(QmpError::generic(format!(
            "Block export id '{id}' is already in use"
        )));
    }
    if st.exports.values().any(|e| e.name == name) {
        return Err(QmpError::generic(format!(
            "NBD server already has export named '{name}'"
        )));
    }
    if writable && node.is_read_only() {
        return Err(QmpError::generic(format!(
            "Cannot export node '{node_name}' writable: the node is read-only"
        )));
    }
    let perms = if writable {
        PermPair::READ_WRITE
    } else {
        PermPair::READ_ONLY
    };
    let backend = d
        .graph
        .new_backend_named(id, &node, perms)
        .map_err(generic)?;
    let export = Arc::new(BackendExport::new(backend));
    st.server
        .add_export(
            name,
            export,
            ExportOptions {
                read_only: !writable,
                description: description.map(str::to_string),
            },
        )
        .map_err(generic)?;
    st.exports.insert(
        id.to_string(),
        ExportEntry {
            name: name.to_string(),
            node: node_name.to_string(),
            seq: st.exports.values().map(|e| e.seq + 1).max().unwrap_or(0),
        },
    );
    log_at!(
        Info,
        "NBD export '{name}' of node '{node_name}' ({})",
        if writable { "writable" } else { "read-only" }
    );
    Ok(json!({}))
}

/// `nbd-server-add` (export id = export name, default the device).
pub(crate) fn nbd_server_add(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let device = a.str("device")?;
    let name = a.opt_str("name").unwrap_or(device);
    add_export(
        d,
        name,
        device,
        name,
        a.opt_bool("writable").unwrap_or(false),
        a.opt_str("description"),
    )
}

/// `block-export-add` (type nbd only).
pub(crate) fn block_export_add(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let ty = a.str("type")?;
    if ty != "nbd" {
        return Err(QmpError::generic(format!(
            "Export type '{ty}' is not supported"
        )));
    }
    if a.has("bitmaps") || a.opt_bool("allocation-depth") == Some(true) {
        return Err(QmpError::generic(
            "NBD export options 'bitmaps' and 'allocation-depth' are not supported",
        ));
    }
    let id = a.str("id")?;
    let node = a.str("node-name")?;
    let name = a.opt_str("name").unwrap_or(node);
    add_export(
        d,
        id,
        node,
        name,
        a.opt_bool("writable").unwrap_or(false),
        a.opt_str("description"),
    )
}

fn remove_mode(a: &Args) -> RemoveMode {
    match a.opt_str("mode") {
        Some("hard") => RemoveMode::Hard,
        _ => RemoveMode::Safe,
    }
}

/// Removes export `id` (QEMU's `qmp_block_export_del`): safe mode refuses
/// while clients are connected ("export 'x' still in use"); hard mode
/// disconnects them after their requests are answered. Emits
/// `BLOCK_EXPORT_DELETED`.
fn del_export(d: &Daemon, st: &mut NbdState, id: &str, mode: RemoveMode) -> Result<(), QmpError> {
    let name = match st.exports.get(id) {
        Some(e) => e.name.clone(),
        None => return Err(QmpError::generic(format!("Export '{id}' is not found"))),
    };
    if mode == RemoveMode::Safe && st.server.connection_count(Some(&name)) > 0 {
        return Err(QmpError::generic(format!("export '{id}' still in use")));
    }
    st.server.remove_export(&name, mode).map_err(|e| {
        if mode == RemoveMode::Safe {
            QmpError::generic(format!("export '{id}' still in use"))
        } else {
            generic(e)
        }
    })?;
    if let Some(e) = st.exports.remove(id) {
        log_at!(Info, "NBD export '{name}' of node '{}' removed", e.node);
    }
    d.events.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
    Ok(())
}

/// `nbd-server-remove`: by export id, which is the name for `nbd-server-add`
/// exports (QEMU looks up the id; a `block-export-add` export's NBD name is
/// accepted too). Mode safe (default) or hard.
pub(crate) fn nbd_server_remove(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let name = a.str("name")?;
    let mut guard = d.nbd.lock();
    let st = guard
        .as_mut()
        .ok_or_else(|| QmpError::generic("NBD server not running"))?;
    let id = if st.exports.contains_key(name) {
        name.to_string()
    } else {
        st.exports
            .iter()
            .find(|(_, e)| e.name == name)
            .map(|(id, _)| id.clone())
            .ok_or_else(|| QmpError::generic(format!("Export '{name}' is not found")))?
    };
    del_export(d, st, &id, remove_mode(a))?;
    Ok(json!({}))
}

/// `block-export-del` (`id`, `mode` safe (default) or hard).
pub(crate) fn block_export_del(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let id = a.str("id")?;
    let mut guard = d.nbd.lock();
    let Some(st) = guard.as_mut() else {
        return Err(QmpError::generic(format!("Export '{id}' is not found")));
    };
    del_export(d, st, id, remove_mode(a))?;
    Ok(json!({}))
}

/// `query-block-exports`: QEMU's `BlockExportInfo` per export
/// (`id`, `type`, `node-name`, `shutting-down`).
pub(crate) fn query_block_exports(d: &Daemon) -> Result<Value, QmpError> {
    let guard = d.nbd.lock();
    let list = match guard.as_ref() {
        None => Vec::new(),
        Some(st) => st
            .ids_in_order()
            .iter()
            .filter_map(|id| st.exports.get(id).map(|e| (id, e)))
            .map(|(id, e)| {
                json!({"id": id, "type": "nbd", "node-name": e.node, "shutting-down": false})
            })
            .collect(),
    };
    Ok(Value::Array(list))
}

/// `nbd-server-stop`: every export removed (clients disconnected after
/// their requests are answered), listeners closed.
pub(crate) fn nbd_server_stop(d: &Daemon) -> Result<Value, QmpError> {
    if d.nbd.lock().is_none() {
        return Err(QmpError::generic("NBD server not running"));
    }
    stop_server(d);
    Ok(json!({}))
}

/// Stops the server if running (also at shutdown).
pub(crate) fn stop_server(d: &Daemon) {
    let st = d.nbd.lock().take();
    if let Some(st) = st {
        for id in st.ids_in_order() {
            let Some(e) = st.exports.get(&id) else {
                continue;
            };
            let _ = st.server.remove_export(&e.name, RemoveMode::Hard);
            d.events.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
        }
        st.server.stop();
        if let Some(p) = &st.unix_path {
            let _ = std::fs::remove_file(p);
        }
        log_at!(Info, "NBD server stopped");
    }
}
