//! Serves a raw file (or a memory disk) over NBD, for manual tests and benchmarks.
//!
//! `cargo run --release -p nbd --example serve -- [--unix PATH] [--port N] [--host H]
//!  [--name NAME] (--file PATH | --mem BYTES) [--read-only] [--workers N]`

use std::sync::Arc;

use nbd::{Export, ExportOptions, FileExport, MemExport, NbdServer, ServerConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let ro = args.iter().any(|a| a == "--read-only");
    let mut cfg = ServerConfig::default();
    if let Some(w) = get("--workers") {
        cfg.workers_per_connection = w.parse().expect("--workers N");
    }
    let export: Arc<dyn Export> = if let Some(f) = get("--file") {
        Arc::new(FileExport::open(f.as_ref(), ro).expect("open --file"))
    } else {
        let size: u64 = get("--mem")
            .unwrap_or("67108864".into())
            .parse()
            .expect("--mem BYTES");
        Arc::new(MemExport::new(size))
    };
    let server = NbdServer::new(cfg);
    let name = get("--name").unwrap_or_default();
    server
        .add_export(
            &name,
            export,
            ExportOptions {
                read_only: ro,
                description: None,
            },
        )
        .expect("add export");
    if let Some(p) = get("--unix") {
        server.listen_unix(p.as_ref()).expect("listen unix");
        eprintln!("listening on unix:{p}");
    }
    if let Some(p) = get("--port") {
        let a = server
            .listen_tcp(get("--host").as_deref(), p.parse().expect("--port N"))
            .expect("listen tcp");
        eprintln!("listening on {a}");
    }
    loop {
        std::thread::park();
    }
}
