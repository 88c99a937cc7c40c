//! Feeds arbitrary bytes to the server as one client connection (handshake and
//! transmission). The server must not panic; it must answer or close.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nbd::{ExportOptions, MemExport, NbdServer, ServerConfig};

fn server() -> &'static NbdServer {
    static S: OnceLock<NbdServer> = OnceLock::new();
    S.get_or_init(|| {
        let s = NbdServer::new(ServerConfig {
            workers_per_connection: 2,
            ..ServerConfig::default()
        });
        s.add_export(
            "d",
            Arc::new(MemExport::new(1 << 20)),
            ExportOptions::default(),
        )
        .expect("add export");
        s.add_export(
            "ro",
            Arc::new(MemExport::new(4096)),
            ExportOptions {
                read_only: true,
                description: Some("read-only".into()),
            },
        )
        .expect("add export");
        s
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = server().serve_io(data, std::io::sink());
});
