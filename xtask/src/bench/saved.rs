//! The measurements of the last run, kept beside the report
//! (`target/xtask-bench-last.json`) so that `cargo xtask bench --render`
//! can write `BENCHMARKS.md` again from the same figures after
//! `xtask/src/bench/notes.md` changed, without measuring again.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::{Missing, Pause, Report, Row};

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn text(v: &Value, key: &str) -> Result<String, String> {
    v[key]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("saved run: no '{key}' in {v}"))
}

/// Figure titles are `&'static str` in the report; a loaded one lives until
/// the process ends (one render).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Writes the run's measurements to `path`.
pub(super) fn save(r: &Report, path: &Path) -> Result<(), String> {
    let rows: Vec<Value> = r
        .rows
        .iter()
        .map(|x| {
            json!({"figure": x.figure, "name": x.name, "bytes": x.bytes,
                   "ours_cmd": x.ours_cmd, "peer_cmd": x.peer_cmd,
                   "ours": x.ours, "peer": x.peer,
                   "p99": x.p99.as_ref().map(|(o, p)| json!([o, p]))})
        })
        .collect();
    let pauses: Vec<Value> = r
        .pauses
        .iter()
        .map(|p| json!({"disk": p.disk, "dirty": p.dirty, "reported": p.reported, "wall": p.wall}))
        .collect();
    let missing: Vec<Value> = r
        .missing
        .iter()
        .map(|m| json!({"figure": m.figure, "what": m.what, "why": m.why}))
        .collect();
    let v = json!({
        "quick": r.quick, "reps": r.reps, "started": r.started,
        "load_start": r.load_start, "load_end": r.load_end,
        "elapsed_s": r.elapsed.as_secs_f64(),
        "criterion_status": r.criterion_status,
        "criterion": r.criterion.iter().map(|(n, a, b, c)| json!([n, a, b, c])).collect::<Vec<_>>(),
        "rows": rows, "pauses": pauses, "missing": missing,
        "versions": r.versions, "guard": r.guard,
    });
    let s = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
    std::fs::write(path, s).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads the measurements `save` wrote.
pub(super) fn load(path: &Path) -> Result<Report, String> {
    let s = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "{}: {e} (run `cargo xtask bench` first: --render re-writes the report of the last run)",
            path.display()
        )
    })?;
    let v: Value = serde_json::from_str(&s).map_err(|e| format!("{}: {e}", path.display()))?;
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut rows = Vec::new();
    for x in v["rows"].as_array().into_iter().flatten() {
        rows.push(Row {
            figure: leak(text(x, "figure")?),
            name: text(x, "name")?,
            bytes: x["bytes"].as_u64().ok_or("saved run: row without bytes")?,
            ours_cmd: text(x, "ours_cmd")?,
            peer_cmd: text(x, "peer_cmd")?,
            ours: f64s(&x["ours"]),
            peer: f64s(&x["peer"]),
            p99: x["p99"].as_array().map(|a| (f64s(&a[0]), f64s(&a[1]))),
        });
    }
    let mut pauses = Vec::new();
    for p in v["pauses"].as_array().into_iter().flatten() {
        pauses.push(Pause {
            disk: text(p, "disk")?,
            dirty: p["dirty"]
                .as_u64()
                .ok_or("saved run: pause without dirty")?,
            reported: f64s(&p["reported"]),
            wall: f64s(&p["wall"]),
        });
    }
    let mut missing = Vec::new();
    for m in v["missing"].as_array().into_iter().flatten() {
        missing.push(Missing {
            figure: leak(text(m, "figure")?),
            what: text(m, "what")?,
            why: text(m, "why")?,
        });
    }
    let criterion = v["criterion"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                c[0].as_str()?.to_string(),
                c[1].as_f64()?,
                c[2].as_f64()?,
                c[3].as_f64()?,
            ))
        })
        .collect();
    Ok(Report {
        quick: v["quick"].as_bool().unwrap_or(false),
        reps: v["reps"].as_u64().unwrap_or(5) as usize,
        started: text(&v, "started")?,
        load_start: text(&v, "load_start")?,
        load_end: text(&v, "load_end")?,
        elapsed: Duration::from_secs_f64(v["elapsed_s"].as_f64().unwrap_or(0.0)),
        criterion_status: text(&v, "criterion_status")?,
        criterion,
        rows,
        pauses,
        missing,
        versions: strings("versions"),
        guard: strings("guard"),
    })
}
