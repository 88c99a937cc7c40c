//! `check`: qcow2 metadata consistency, as `qemu-img check` reports it.
//! Exit codes: 0 clean, 1 check failed, 2 corruptions, 3 leaks, 63 format
//! without checks.

use super::chain::open_layer;
use super::header::{ClusterKind, L2Walker, QHeader};
use super::{print_json, Format, ImageOpt, ImgError, OutputFormat, VerbResult};
use clap::{Args, ValueEnum};
use qcow_lite::{CheckReport, Qcow2};
use serde_json::{json, Map, Value};
use std::fs::File;
use std::path::Path;

/// What `-r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Repair {
    /// Only leaked clusters.
    Leaks,
    /// Leaks and corruptions.
    All,
}

/// Arguments of `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    image: ImageOpt,
    /// Output format.
    #[arg(long = "output", value_enum, default_value = "human")]
    output: OutputFormat,
    /// Repair leaks, or all errors.
    #[arg(short = 'r', value_enum)]
    repair: Option<Repair>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Force share (accepted for compatibility; we take no locks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: String,
}

/// Cluster statistics qemu-img prints (from the L2 tables).
#[derive(Debug, Default, Clone, Copy)]
struct Frag {
    total: u64,
    allocated: u64,
    fragmented: u64,
    compressed: u64,
    /// End of the highest cluster some metadata refers to.
    referenced_end: u64,
}

fn frag_info(path: &Path, name: &str) -> Result<Frag, ImgError> {
    let f = File::open(path).map_err(|e| ImgError::Open {
        path: name.to_string(),
        source: e,
    })?;
    let h = QHeader::read(&f, name)?;
    let cs = h.cluster_size();
    let rt = read_refcount_table(&f, &h, name)?;
    let mut w = L2Walker::new(f, &h, name)?;
    let mut fr = Frag {
        total: h.size.div_ceil(cs),
        ..Default::default()
    };
    let mut next: u64;
    let mut top = cs; // the header cluster
    let mut reach = |off: u64, len: u64| top = top.max((off + len).div_ceil(cs) * cs);
    reach(h.l1_table_offset, h.l1_size as u64 * 8);
    reach(
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * cs,
    );
    for &b in &rt {
        if b != 0 {
            reach(b, cs);
        }
    }
    for i in 0..w.l1_len() {
        let l2 = w.l2_offset(i);
        if l2 != 0 {
            reach(l2, cs);
        }
        let Some(t) = w.l2_table(i)? else { continue };
        // QEMU counts fragmentation within each L2 table.
        next = 0;
        for &raw in t {
            match L2Walker::decode(raw) {
                ClusterKind::Normal(off) | ClusterKind::ZeroAlloc(off) => {
                    reach(off, cs);
                    fr.allocated += 1;
                    if next != 0 && off != next {
                        fr.fragmented += 1;
                    }
                    next = off + cs;
                }
                ClusterKind::Compressed => {
                    fr.allocated += 1;
                    fr.compressed += 1;
                }
                _ => {}
            }
        }
    }
    fr.referenced_end = top;
    Ok(fr)
}

/// Offsets of the refcount blocks (the refcount table's entries).
fn read_refcount_table(f: &File, h: &QHeader, name: &str) -> Result<Vec<u64>, ImgError> {
    use std::os::unix::fs::FileExt;
    let len = h.refcount_table_clusters as u64 * h.cluster_size();
    if len > 8 << 20 {
        return Err(ImgError::image(format!(
            "'{name}': refcount table of {len} bytes is too large"
        )));
    }
    let mut b = vec![0u8; len as usize];
    let mut done = 0usize;
    while done < b.len() {
        match f.read_at(&mut b[done..], h.refcount_table_offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => return Err(ImgError::io(format!("read refcount table of '{name}'"), e)),
        }
    }
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])) & !0x1ff)
        .collect())
}

fn check_once(path: &Path, name: &str) -> Result<CheckReport, ImgError> {
    let f = File::open(path).map_err(|e| ImgError::Open {
        path: name.to_string(),
        source: e,
    })?;
    let q =
        Qcow2::open(f, true).map_err(|e| ImgError::qcow(format!("Could not open '{name}'"), e))?;
    q.check()
        .map_err(|e| ImgError::qcow(format!("Check of '{name}' failed"), e))
}

/// Run `check`.
pub fn run(a: CheckArgs) -> VerbResult {
    let _ = a.force_share;
    let name = a.filename.clone();
    let path = Path::new(&name);
    let layer = open_layer(
        path,
        &name,
        super::opt_fmt(&a.image.format).map_err(|e| (e, 1))?,
        false,
    )
    .map_err(|e| (e, 1))?;
    if layer.format != Format::Qcow2 {
        return Err((
            ImgError::image("This image format does not support checks"),
            63,
        ));
    }
    drop(layer);
    // qcow-lite's check counts 16-bit refcounts only.
    let order = std::fs::File::open(path)
        .map_err(|e| ImgError::Open {
            path: name.clone(),
            source: e,
        })
        .and_then(|f| QHeader::read(&f, &name))
        .map_err(|e| (e, 1))?
        .refcount_order;
    if order != 4 {
        return Err((
            ImgError::image(format!(
                "Check of '{name}' is not supported: refcount_bits={} (only 16 is supported)",
                1u64 << order.min(6)
            )),
            1,
        ));
    }
    let before = check_once(path, &name).map_err(|e| (e, 1))?;
    let mut report = before.clone();
    let (mut leaks_fixed, mut corruptions_fixed) = (0, 0);
    if let Some(mode) = a.repair {
        let needed = match mode {
            Repair::Leaks => before.leaks > 0,
            Repair::All => !before.is_clean(),
        };
        if mode == Repair::Leaks && before.corruptions > 0 {
            // Our repair rebuilds every refcount; with corruptions present
            // that would fix them too, which -r leaks must not do.
            return Err((
                ImgError::image(format!(
                    "Check failed: '{name}' has {} corruptions; repairing leaks alone is not possible, use -r all",
                    before.corruptions
                )),
                1,
            ));
        }
        if needed {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| {
                    (
                        ImgError::Open {
                            path: name.clone(),
                            source: e,
                        },
                        1,
                    )
                })?;
            let q = Qcow2::open(f, false)
                .map_err(|e| (ImgError::qcow(format!("Could not open '{name}'"), e), 1))?;
            q.repair()
                .map_err(|e| (ImgError::qcow(format!("Repair of '{name}' failed"), e), 1))?;
            q.close()
                .map_err(|e| (ImgError::qcow(format!("close '{name}'"), e), 1))?;
            drop(q);
            report = check_once(path, &name).map_err(|e| (e, 1))?;
            leaks_fixed = before.leaks.saturating_sub(report.leaks);
            corruptions_fixed = before.corruptions.saturating_sub(report.corruptions);
        }
    }
    let fr = frag_info(path, &name).map_err(|e| (e, 1))?;
    // QEMU's image end counts clusters that are referenced even when their
    // stored refcount is 0 (qcow-lite's report only counts the latter).
    report.image_end_offset = report.image_end_offset.max(fr.referenced_end);
    match a.output {
        OutputFormat::Json => {
            let mut m = Map::new();
            if report.image_end_offset != 0 {
                m.insert("image-end-offset".into(), json!(report.image_end_offset));
            }
            if fr.total != 0 {
                m.insert("total-clusters".into(), json!(fr.total));
            }
            m.insert("check-errors".into(), json!(0));
            if fr.allocated != 0 {
                m.insert("allocated-clusters".into(), json!(fr.allocated));
            }
            m.insert("filename".into(), json!(name));
            m.insert("format".into(), json!("qcow2"));
            for (k, v) in [
                ("leaks", report.leaks),
                ("corruptions", report.corruptions),
                ("leaks-fixed", leaks_fixed),
                ("corruptions-fixed", corruptions_fixed),
                ("fragmented-clusters", fr.fragmented),
                ("compressed-clusters", fr.compressed),
            ] {
                if v != 0 {
                    m.insert(k.into(), json!(v));
                }
            }
            print_json(&Value::Object(m));
        }
        OutputFormat::Human if !a.quiet => print_human(&report, leaks_fixed, corruptions_fixed, fr),
        OutputFormat::Human => {}
    }
    Ok(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}

fn print_human(r: &CheckReport, leaks_fixed: u64, corr_fixed: u64, fr: Frag) {
    for m in &r.messages {
        eprintln!("{m}");
    }
    if leaks_fixed > 0 || corr_fixed > 0 {
        println!("The following inconsistencies were found and repaired:\n");
        println!("    {leaks_fixed} leaked clusters");
        println!("    {corr_fixed} corruptions\n");
        println!("Double checking the fixed image now...");
    }
    if r.is_clean() {
        println!("No errors were found on the image.");
    } else {
        if r.corruptions > 0 {
            println!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            println!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                r.leaks
            );
        }
    }
    if fr.total != 0 {
        let pct = |n: u64| n as f64 * 100.0 / fr.total as f64;
        let pct_a = |n: u64| {
            if fr.allocated == 0 {
                0.0
            } else {
                n as f64 * 100.0 / fr.allocated as f64
            }
        };
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            fr.allocated,
            fr.total,
            pct(fr.allocated),
            pct_a(fr.fragmented),
            pct_a(fr.compressed)
        );
    }
    if r.image_end_offset != 0 {
        println!("Image end offset: {}", r.image_end_offset);
    }
}
