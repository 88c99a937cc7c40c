//! A lone request runs on the thread that read it (no worker is woken for it);
//! the reading passes to a worker meanwhile, so a request that blocks does not
//! hold up the connection's next requests.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::{pattern, Gates};
use nbd::{ExportOptions, MemExport, NbdClient, NbdServer, ServerAddr, ServerConfig};

#[test]
fn a_blocked_lone_request_does_not_stop_the_next_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::new(ServerConfig {
        workers_per_connection: 1,
        ..ServerConfig::default()
    });
    let export = Arc::new(Gates::new(1 << 20, &[0]));
    server
        .add_export("d", export.clone(), ExportOptions::default())
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    server.listen_unix(&sock).unwrap();
    let client = Arc::new(NbdClient::connect(ServerAddr::Unix(sock), "d").unwrap());

    // The only request in flight: the thread that read it runs it, and blocks.
    let c = client.clone();
    let blocked = std::thread::spawn(move || c.write(0, &[0xaa; 4096], false));
    export.wait_entered(0);

    // Later requests on the same connection are still read and answered.
    let (tx, rx) = mpsc::channel();
    let c = client.clone();
    std::thread::spawn(move || {
        let data = pattern(7, 8192);
        let r = c.write(65536, &data, false).and_then(|()| {
            let mut back = vec![0u8; 8192];
            c.read(65536, &mut back).map(|()| back == data)
        });
        let _ = tx.send(r);
    });
    let answered = rx.recv_timeout(Duration::from_secs(10));
    assert!(
        matches!(answered, Ok(Ok(true))),
        "requests behind a blocked one were not answered: {answered:?}"
    );
    assert!(!blocked.is_finished(), "the gated write completed early");

    export.open(0);
    blocked.join().unwrap().unwrap();
    let mut back = vec![0u8; 4096];
    client.read(0, &mut back).unwrap();
    assert_eq!(back, vec![0xaa; 4096]);
    client.close();
    server.stop();
}

#[test]
fn many_lone_requests_in_a_row_keep_their_data() {
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::new(ServerConfig::default());
    let mem = Arc::new(MemExport::new(4 << 20));
    server
        .add_export("d", mem.clone(), ExportOptions::default())
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    server.listen_unix(&sock).unwrap();
    let client = NbdClient::connect(ServerAddr::Unix(sock), "d").unwrap();
    // One request at a time: every one is lone, so the reading changes thread
    // on each, and each reply must still belong to its request.
    let data = pattern(3, 4 << 20);
    for (i, chunk) in data.chunks(65536).enumerate() {
        client.write(i as u64 * 65536, chunk, false).unwrap();
    }
    client.flush().unwrap();
    let mut back = vec![0u8; 4 << 20];
    for (i, chunk) in back.chunks_mut(65536).enumerate().rev() {
        client.read(i as u64 * 65536, chunk).unwrap();
    }
    assert_eq!(back, data);
    assert_eq!(mem.snapshot(), data);
    client.close();
    server.stop();
}
