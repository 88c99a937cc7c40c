//! The client's receive side is taken by whichever caller waits for a reply:
//! it reads the other callers' replies for them, and when its own has come
//! it hands the reading to a caller still waiting.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::{pattern, Gates};
use nbd::{ExportOptions, NbdClient, NbdServer, ServerAddr, ServerConfig};

fn serve(export: Arc<Gates>) -> (tempfile::TempDir, NbdServer, Arc<NbdClient>) {
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::new(ServerConfig::default());
    server
        .add_export("d", export, ExportOptions::default())
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    server.listen_unix(&sock).unwrap();
    let client = Arc::new(NbdClient::connect(ServerAddr::Unix(sock), "d").unwrap());
    (dir, server, client)
}

/// Runs `f` on a new thread; its result arrives on the returned channel.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

#[test]
fn the_reading_passes_to_a_waiting_caller_when_the_reader_is_answered() {
    const A: u64 = 0;
    const B: u64 = 65536;
    let export = Arc::new(Gates::new(1 << 20, &[A, B]));
    let (_dir, server, client) = serve(export.clone());

    // A is alone in flight: its caller reads the socket, waiting.
    let c = client.clone();
    let a = spawn(move || c.write(A, &[0xaa; 4096], false));
    export.wait_entered(A);
    // B's caller finds the reading taken and sleeps.
    let c = client.clone();
    let b = spawn(move || c.write(B, &[0xbb; 4096], false));
    export.wait_entered(B);
    std::thread::sleep(Duration::from_millis(50));

    // A's reply ends A's reading; B must take it over, or nothing reads B's reply.
    export.open(A);
    a.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    export.open(B);
    let got = b.recv_timeout(Duration::from_secs(10));
    assert!(
        matches!(got, Ok(Ok(()))),
        "B's reply never reached it after A's caller stopped reading: {got:?}"
    );
    let mut back = vec![0u8; 4096];
    client.read(B, &mut back).unwrap();
    assert_eq!(back, vec![0xbb; 4096]);
    client.close();
    server.stop();
}

#[test]
fn a_caller_waiting_for_a_slow_reply_reads_the_others_replies() {
    const SLOW: u64 = 0;
    let export = Arc::new(Gates::new(4 << 20, &[SLOW]));
    let (_dir, server, client) = serve(export.clone());

    let c = client.clone();
    let slow = spawn(move || c.write(SLOW, &[0x5a; 4096], false));
    export.wait_entered(SLOW);

    // Four threads with 32 requests each, answered while the slow one waits.
    let done: Vec<_> = (0..4u64)
        .map(|t| {
            let c = client.clone();
            spawn(move || {
                for i in 0..16u64 {
                    let off = (1 << 20) + (t * 16 + i) * 16384;
                    let data = pattern(t * 100 + i, 16384);
                    c.write(off, &data, false)?;
                    let mut back = vec![0u8; 16384];
                    c.read(off, &mut back)?;
                    assert_eq!(back, data, "thread {t} request {i}");
                }
                Ok::<(), nbd::NbdError>(())
            })
        })
        .collect();
    for (t, d) in done.into_iter().enumerate() {
        let r = d.recv_timeout(Duration::from_secs(20));
        assert!(matches!(r, Ok(Ok(()))), "thread {t}: {r:?}");
    }
    assert!(
        slow.try_recv().is_err(),
        "the gated write completed before its gate opened"
    );
    export.open(SLOW);
    slow.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    client.close();
    server.stop();
}
