//! `info`: format, sizes, backing file and qcow2 specifics, as `qemu-img info` prints them.

use super::chain::backing_path;
use super::header::{is_qcow2, QHeader};
use super::size::size_to_str;
use super::Format;
use super::{fail1, print_json, ImageOpt, ImgError, OutputFormat, VerbResult};
use clap::Args;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Arguments of `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    image: ImageOpt,
    /// Output format.
    #[arg(long = "output", value_enum, default_value = "human")]
    output: OutputFormat,
    /// Show every image of the backing chain.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Force share (accepted for compatibility; we take no locks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: String,
}

/// What `info` shows of one image: only the header is read, so images
/// that qcow-lite refuses to open (version 2, extended L2...) still show.
struct Layer {
    name: String,
    path: PathBuf,
    format: Format,
    header: Option<QHeader>,
    size: u64,
}

impl Layer {
    fn size(&self) -> u64 {
        self.size
    }
}

fn open_layer(path: &Path, name: &str, fmt: Option<Format>, _rw: bool) -> Result<Layer, ImgError> {
    if path.is_dir() {
        return Err(ImgError::image(format!(
            "Could not open '{name}': Is a directory"
        )));
    }
    let f = std::fs::File::open(path).map_err(|e| ImgError::Open {
        path: name.to_string(),
        source: e,
    })?;
    let qcow = is_qcow2(&f)?;
    let format = match fmt {
        Some(Format::Qcow2) if !qcow => {
            return Err(ImgError::image(format!(
                "Could not open '{name}': Image is not in qcow2 format"
            )))
        }
        Some(f) => f,
        None if qcow => Format::Qcow2,
        None => Format::Raw,
    };
    let (header, size) = match format {
        Format::Qcow2 => {
            let h = QHeader::read(&f, name)?;
            let size = h.size;
            (Some(h), size)
        }
        Format::Raw => {
            let len = f
                .metadata()
                .map_err(|e| ImgError::io(format!("stat '{name}'"), e))?
                .len();
            (None, len.div_ceil(512) * 512)
        }
    };
    Ok(Layer {
        name: name.to_string(),
        path: path.to_path_buf(),
        format,
        header,
        size,
    })
}

fn file_info(path: &Path, name: &str) -> Result<(u64, u64), ImgError> {
    let md = std::fs::metadata(path).map_err(|e| ImgError::Open {
        path: name.to_string(),
        source: e,
    })?;
    // QEMU counts file lengths in whole 512-byte sectors.
    Ok((md.len().div_ceil(512) * 512, md.blocks() * 512))
}

/// The JSON object qemu-img prints for one image.
fn image_json(l: &Layer) -> Result<Value, ImgError> {
    let (flen, actual) = file_info(&l.path, &l.name)?;
    let mut m = Map::new();
    m.insert(
        "children".into(),
        json!([{
            "name": "file",
            "info": {
                "children": [],
                "virtual-size": flen,
                "filename": l.name,
                "format": "file",
                "actual-size": actual,
                "format-specific": {"type": "file", "data": {}},
                "dirty-flag": false
            }
        }]),
    );
    m.insert("virtual-size".into(), json!(l.size()));
    m.insert("filename".into(), json!(l.name));
    m.insert("format".into(), json!(l.format.name()));
    m.insert("actual-size".into(), json!(actual));
    let mut dirty = false;
    if let Some(h) = &l.header {
        m.insert("cluster-size".into(), json!(h.cluster_size()));
        if let Some(b) = &h.backing_file {
            m.insert("backing-filename".into(), json!(b));
            m.insert(
                "full-backing-filename".into(),
                json!(backing_path(&l.path, b).display().to_string()),
            );
        }
        if let Some(f) = &h.backing_format {
            m.insert("backing-filename-format".into(), json!(f));
        }
        m.insert(
            "format-specific".into(),
            json!({
                "type": "qcow2",
                "data": {
                    "compat": if h.version >= 3 { "1.1" } else { "0.10" },
                    "compression-type": if h.compression_type == 1 { "zstd" } else { "zlib" },
                    "lazy-refcounts": h.compatible & 1 != 0,
                    "refcount-bits": 1u64 << h.refcount_order.min(6),
                    "corrupt": h.incompatible & 2 != 0,
                    "extended-l2": h.incompatible & 16 != 0
                }
            }),
        );
        if h.version < 3 {
            // Version 2 has no feature bits: QEMU prints only these.
            if let Some(d) = m
                .get_mut("format-specific")
                .and_then(|v| v.get_mut("data"))
                .and_then(|v| v.as_object_mut())
            {
                for k in ["lazy-refcounts", "corrupt", "extended-l2"] {
                    d.remove(k);
                }
            }
        }
        dirty = h.incompatible & 1 != 0;
    }
    m.insert("dirty-flag".into(), json!(dirty));
    Ok(Value::Object(m))
}

fn print_human(l: &Layer, v: &Value) -> Result<(), ImgError> {
    let (flen, actual) = file_info(&l.path, &l.name)?;
    let size = l.size();
    println!("image: {}", l.name);
    println!("file format: {}", l.format.name());
    println!("virtual size: {} ({size} bytes)", size_to_str(size));
    println!("disk size: {}", size_to_str(actual));
    if let Some(h) = &l.header {
        println!("cluster_size: {}", h.cluster_size());
        if let Some(b) = &h.backing_file {
            let full = backing_path(&l.path, b).display().to_string();
            if &full == b {
                println!("backing file: {b}");
            } else {
                println!("backing file: {b} (actual path: {full})");
            }
        }
        if let Some(f) = &h.backing_format {
            println!("backing file format: {f}");
        }
        if h.incompatible & 1 != 0 {
            println!("cleanly shut down: no");
        }
        println!("Format specific information:");
        let d = &v["format-specific"]["data"];
        println!("    compat: {}", d["compat"].as_str().unwrap_or("1.1"));
        println!(
            "    compression type: {}",
            d["compression-type"].as_str().unwrap_or("zlib")
        );
        if h.version < 3 {
            println!("    refcount bits: {}", d["refcount-bits"]);
        } else {
            println!("    lazy refcounts: {}", d["lazy-refcounts"]);
            println!("    refcount bits: {}", d["refcount-bits"]);
            println!("    corrupt: {}", d["corrupt"]);
            println!("    extended l2: {}", d["extended-l2"]);
        }
    }
    println!("Child node '/file':");
    println!("    filename: {}", l.name);
    println!("    protocol type: file");
    println!("    file length: {} ({flen} bytes)", size_to_str(flen));
    println!("    disk size: {}", size_to_str(actual));
    Ok(())
}

/// Run `info`.
pub fn run(a: InfoArgs) -> VerbResult {
    let _ = a.force_share;
    fail1(run_inner(a)).map(|()| 0)
}

fn run_inner(a: InfoArgs) -> Result<(), ImgError> {
    let mut layers = vec![open_layer(
        Path::new(&a.filename),
        &a.filename,
        super::opt_fmt(&a.image.format)?,
        false,
    )?];
    if a.backing_chain {
        let mut seen: HashSet<PathBuf> = HashSet::new();
        seen.insert(
            std::fs::canonicalize(&a.filename).unwrap_or_else(|_| a.filename.clone().into()),
        );
        loop {
            let last = layers.last().expect("at least the top");
            let Some(h) = &last.header else { break };
            let Some(b) = &h.backing_file else { break };
            let fmt = match h.backing_format.as_deref() {
                Some(f) => Some(super::Format::parse(f)?),
                None => None,
            };
            let bp = backing_path(&last.path, b);
            if !seen.insert(std::fs::canonicalize(&bp).unwrap_or_else(|_| bp.clone())) {
                return Err(ImgError::image(format!(
                    "Backing file loop: '{}' appears twice in the backing chain of '{}'",
                    bp.display(),
                    a.filename
                )));
            }
            let name = bp.display().to_string();
            let l = open_layer(&bp, &name, fmt, false)?;
            layers.push(l);
        }
    }
    match a.output {
        OutputFormat::Json => {
            let vals: Vec<Value> = layers.iter().map(image_json).collect::<Result<_, _>>()?;
            if a.backing_chain {
                print_json(&Value::Array(vals));
            } else {
                print_json(&vals[0]);
            }
        }
        OutputFormat::Human => {
            for (i, l) in layers.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_human(l, &image_json(l)?)?;
            }
        }
    }
    Ok(())
}
