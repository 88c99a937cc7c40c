//! `create`: a new qcow2 or raw image, optionally over a backing file.

use super::chain::{backing_path, open_layer};
use super::size::parse_size;
use super::{fail1, opt_fmt, Format, FormatName, ImgError, VerbResult};
use clap::Args;
use qcow_lite::{CreateOptions, Preallocation, Qcow2};
use std::fs::OpenOptions;
use std::path::Path;

/// Arguments of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Format of the new image.
    #[arg(short = 'f', default_value = "raw")]
    format: FormatName,
    /// Backing file (qcow2 only); its name is stored as given.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F')]
    backing_format: Option<FormatName>,
    /// Options: cluster_size, lazy_refcounts, preallocation, compat, refcount_bits, ...
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Do not open the backing file (a size must then be given).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image file to create.
    filename: String,
    /// Virtual size (512, 64M, 1.5G, 1T...); defaults to the backing file's.
    #[arg(allow_negative_numbers = true)]
    size: Option<String>,
}

/// Options parsed from `-o` strings.
#[derive(Debug, Default, Clone)]
pub struct FormatOptions {
    /// `cluster_size` (qcow2).
    pub cluster_size: Option<u64>,
    /// `lazy_refcounts=on` (qcow2).
    pub lazy_refcounts: bool,
    /// `preallocation=off|metadata`.
    pub preallocation: Preallocation,
    /// `backing_file` (qcow2).
    pub backing_file: Option<String>,
    /// `backing_fmt` (qcow2).
    pub backing_fmt: Option<Format>,
    /// `size`.
    pub size: Option<u64>,
}

fn on_off(key: &str, v: &str) -> Result<bool, ImgError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ImgError::usage(format!(
            "Parameter '{key}' expects 'on' or 'off', not '{v}'"
        ))),
    }
}

/// Parse `-o key=value,...` strings for `fmt`.
pub fn parse_options(opts: &[String], fmt: Format) -> Result<FormatOptions, ImgError> {
    let mut o = FormatOptions::default();
    for s in opts {
        for kv in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
            let qcow_only = || {
                if fmt != Format::Qcow2 {
                    Err(ImgError::usage(format!(
                        "Invalid parameter '{k}' for format {}",
                        fmt.name()
                    )))
                } else {
                    Ok(())
                }
            };
            match k {
                "size" => o.size = Some(parse_size(v)?),
                "cluster_size" => {
                    qcow_only()?;
                    let cs = parse_size(v)?;
                    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
                        return Err(ImgError::usage(format!(
                            "Cluster size must be a power of two between 512 and 2048k, not {v}"
                        )));
                    }
                    o.cluster_size = Some(cs);
                }
                "lazy_refcounts" => {
                    qcow_only()?;
                    o.lazy_refcounts = on_off(k, v)?;
                }
                "preallocation" => {
                    match v {
                        "off" => o.preallocation = Preallocation::Off,
                        "metadata" if fmt == Format::Qcow2 => {
                            o.preallocation = Preallocation::Metadata
                        }
                        _ => {
                            return Err(ImgError::usage(format!(
                            "Unsupported preallocation mode '{v}' for format {} (supported: off{})",
                            fmt.name(),
                            if fmt == Format::Qcow2 { ", metadata" } else { "" }
                        )))
                        }
                    }
                }
                "compat" => {
                    qcow_only()?;
                    if v != "1.1" && v != "v3" {
                        return Err(ImgError::usage(format!(
                            "Unsupported compat level '{v}' (only 1.1 is supported)"
                        )));
                    }
                }
                "refcount_bits" => {
                    qcow_only()?;
                    if v != "16" {
                        return Err(ImgError::usage(format!(
                            "Unsupported refcount_bits '{v}' (only 16 is supported)"
                        )));
                    }
                }
                "extended_l2" => {
                    qcow_only()?;
                    if on_off(k, v)? {
                        return Err(ImgError::usage("Unsupported feature: extended_l2=on"));
                    }
                }
                "compression_type" => {
                    qcow_only()?;
                    if v != "zlib" {
                        return Err(ImgError::usage(format!(
                            "Unsupported compression_type '{v}' (only zlib)"
                        )));
                    }
                }
                "backing_file" => {
                    qcow_only()?;
                    o.backing_file = Some(v.to_string());
                }
                "backing_fmt" => {
                    qcow_only()?;
                    o.backing_fmt = Some(Format::parse(v)?);
                }
                _ => {
                    return Err(ImgError::usage(format!(
                        "Invalid parameter '{k}' for format {}",
                        fmt.name()
                    )))
                }
            }
        }
    }
    Ok(o)
}

/// Create `filename` as `fmt` with `size` bytes and options `o` (backing
/// already checked). Prints qemu-img's "Formatting" line unless `quiet`.
pub fn create_image(
    filename: &str,
    fmt: Format,
    size: u64,
    o: &FormatOptions,
    quiet: bool,
) -> Result<(), ImgError> {
    let cs = o.cluster_size.unwrap_or(65536);
    if !quiet {
        let mut line = format!("Formatting '{filename}', fmt={}", fmt.name());
        if fmt == Format::Qcow2 {
            line += &format!(" cluster_size={cs} extended_l2=off");
            if o.preallocation == Preallocation::Metadata {
                line += " preallocation=metadata";
            }
            line += " compression_type=zlib";
        }
        line += &format!(" size={size}");
        if let Some(b) = &o.backing_file {
            line += &format!(" backing_file={b}");
            if let Some(f) = o.backing_fmt {
                line += &format!(" backing_fmt={}", f.name());
            }
        }
        if fmt == Format::Qcow2 {
            line += &format!(
                " lazy_refcounts={} refcount_bits=16",
                if o.lazy_refcounts { "on" } else { "off" }
            );
        }
        println!("{line}");
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(filename)
        .map_err(|e| ImgError::Open {
            path: filename.to_string(),
            source: e,
        })?;
    match fmt {
        Format::Raw => {
            f.set_len(size)
                .map_err(|e| ImgError::io(format!("resize '{filename}'"), e))?;
            // Like QEMU, allocate the first block so that tools probing the
            // file's allocation see the same thing on both sides.
            if size > 0 {
                use std::os::unix::fs::FileExt;
                let n = size.min(4096) as usize;
                f.write_all_at(&vec![0u8; n], 0)
                    .map_err(|e| ImgError::io(format!("write '{filename}'"), e))?;
            }
            f.sync_all()
                .map_err(|e| ImgError::io(format!("flush '{filename}'"), e))
        }
        Format::Qcow2 => {
            let opts = CreateOptions {
                // QEMU rounds qcow2 sizes up to whole 512-byte sectors.
                size: size.div_ceil(512) * 512,
                cluster_size: cs,
                backing_file: o.backing_file.clone(),
                backing_format: o.backing_fmt.map(|f| f.name().to_string()),
                lazy_refcounts: o.lazy_refcounts,
                preallocation: o.preallocation,
            };
            let img = Qcow2::create(f, &opts)
                .map_err(|e| ImgError::qcow(format!("{filename}: create"), e))?;
            img.close()
                .map_err(|e| ImgError::qcow(format!("{filename}: close"), e))
        }
    }
}

/// Run `create`.
pub fn run(a: CreateArgs) -> VerbResult {
    fail1(run_inner(a)).map(|()| 0)
}

fn run_inner(a: CreateArgs) -> Result<(), ImgError> {
    let format = a.format.get()?;
    let mut o = parse_options(&a.options, format)?;
    if let Some(b) = a.backing {
        o.backing_file = Some(b);
    }
    if let Some(f) = opt_fmt(&a.backing_format)? {
        o.backing_fmt = Some(f);
    }
    let mut size = match &a.size {
        Some(s) => Some(parse_size(s).map_err(|_| {
            ImgError::usage(format!(
                "Invalid image size specified: '{s}' (use a number of bytes with an optional k, M, G, T, P or E suffix)"
            ))
        })?),
        None => o.size,
    };
    let fname = &a.filename;
    if let Some(b) = &o.backing_file {
        if format != Format::Qcow2 {
            return Err(ImgError::usage(format!(
                "{fname}: format {} does not support backing files",
                format.name()
            )));
        }
        let bpath = backing_path(Path::new(fname), b);
        let same = std::fs::canonicalize(&bpath)
            .ok()
            .is_some_and(|p| std::fs::canonicalize(fname).ok() == Some(p))
            || bpath == Path::new(fname);
        if same {
            return Err(ImgError::usage(format!(
                "{fname}: Error: Trying to create an image with the same filename as the backing file"
            )));
        }
        if !a.unsafe_backing {
            let bdisp = bpath.display().to_string();
            let layer = open_layer(&bpath, &bdisp, o.backing_fmt, false).map_err(|e| {
                ImgError::image(format!("{fname}: Could not open backing image: {e}"))
            })?;
            if o.backing_fmt.is_none() {
                return Err(ImgError::usage(format!(
                    "{fname}: Backing file specified without backing format (detected format: {}; pass -F {})",
                    layer.format.name(),
                    layer.format.name()
                )));
            }
            if size.is_none() {
                size = Some(layer.size());
            }
        } else if o.backing_fmt.is_none() {
            return Err(ImgError::usage(format!(
                "{fname}: -u requires the backing format (-F)"
            )));
        }
    }
    let Some(size) = size else {
        return Err(ImgError::usage(format!(
            "{fname}: Image creation needs a size parameter"
        )));
    };
    create_image(fname, format, size, &o, a.quiet)
}
