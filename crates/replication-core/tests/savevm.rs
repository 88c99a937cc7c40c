//! Unit tests of the checkpoint state registry and its stream.

mod common;

use std::sync::Arc;

use common::Scripted;
use replication_core::{
    ErrorKind, SavePhase, SectionKind, StateParticipant, StateRegistry, MAX_SECTION_PAYLOAD,
};

fn save(reg: &StateRegistry) -> Vec<u8> {
    let mut out = Vec::new();
    reg.save(&mut out).unwrap();
    out
}

#[test]
fn round_trip_setup_iterate_complete() {
    let src = StateRegistry::new();
    let a = Arc::new(Scripted::new(b"A-setup", &[b"A1", b"A2"], b"A-end"));
    let b = Arc::new(Scripted::new(b"", &[], b"B-end"));
    let _ha = src.register("disk", None, 3, a.clone()).unwrap();
    let _hb = src.register("colo", Some(7), 1, b.clone()).unwrap();
    assert_eq!(src.pending().precopy_only, 2);
    assert_eq!(src.pending().compatible, 4);
    let stream = save(&src);
    assert_eq!(a.cleanups(), 1);
    assert_eq!(b.cleanups(), 1);
    assert_eq!(src.pending().total(), 0);

    let dst = StateRegistry::new();
    let ra = Arc::new(Scripted::sink());
    let rb = Arc::new(Scripted::sink());
    let _ra = dst.register("disk", Some(0), 3, ra.clone()).unwrap();
    let _rb = dst.register("colo", Some(7), 1, rb.clone()).unwrap();
    let n = dst.load(&mut stream.as_slice()).unwrap();
    assert_eq!(n, 6);
    assert_eq!(
        ra.loaded(),
        vec![
            (SectionKind::Setup, 0, 3, b"A-setup".to_vec()),
            (SectionKind::Iterate, 0, 3, b"A1".to_vec()),
            (SectionKind::Iterate, 0, 3, b"A2".to_vec()),
            (SectionKind::Complete, 0, 3, b"A-end".to_vec()),
        ]
    );
    assert_eq!(
        rb.loaded(),
        vec![
            (SectionKind::Setup, 7, 1, vec![]),
            (SectionKind::Complete, 7, 1, b"B-end".to_vec()),
        ]
    );
}

#[test]
fn instance_none_means_next_free() {
    let reg = StateRegistry::new();
    let p = || Arc::new(Scripted::sink()) as Arc<dyn StateParticipant>;
    let h0 = reg.register("dev", None, 1, p()).unwrap();
    let h1 = reg.register("dev", None, 1, p()).unwrap();
    let h5 = reg.register("dev", Some(5), 1, p()).unwrap();
    let h6 = reg.register("dev", None, 1, p()).unwrap();
    let other = reg.register("other", None, 1, p()).unwrap();
    assert_eq!(
        [h0.instance(), h1.instance(), h5.instance(), h6.instance()],
        [0, 1, 5, 6]
    );
    assert_eq!(other.instance(), 0);
    assert_eq!(h0.id(), "dev");
    let dup = reg.register("dev", Some(5), 2, p()).unwrap_err();
    assert_eq!(dup.kind(), ErrorKind::Registration);
    assert!(dup.to_string().contains("'dev' instance 5"), "{dup}");
    assert!(h5.remove());
    let again = reg.register("dev", Some(5), 1, p()).unwrap();
    assert_eq!(again.instance(), 5);
    let max = reg.register("dev", Some(u32::MAX), 1, p()).unwrap();
    let err = reg.register("dev", None, 1, p()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Registration);
    drop(max);
    assert_eq!(reg.participants().len(), 5);
}

#[test]
fn invalid_ids_refused() {
    let reg = StateRegistry::new();
    let p = Arc::new(Scripted::sink());
    assert_eq!(
        reg.register("", None, 1, p.clone()).unwrap_err().kind(),
        ErrorKind::Registration
    );
    let long = "x".repeat(256);
    assert_eq!(
        reg.register(&long, None, 1, p.clone()).unwrap_err().kind(),
        ErrorKind::Registration
    );
    let ok = "y".repeat(255);
    let h = reg.register(&ok, None, 1, p.clone()).unwrap();
    let stream = save(&reg);
    drop(h);
    let dst = StateRegistry::new();
    let q = Arc::new(Scripted::sink());
    let _h = dst.register(&ok, Some(0), 1, q.clone()).unwrap();
    dst.load(&mut stream.as_slice()).unwrap();
    assert_eq!(q.loaded().len(), 2);
}

#[test]
fn unknown_id_refused_before_anything_loads() {
    let src = StateRegistry::new();
    let _a = src
        .register("known", None, 1, Arc::new(Scripted::sink()))
        .unwrap();
    let _b = src
        .register("mystery", None, 1, Arc::new(Scripted::sink()))
        .unwrap();
    let stream = save(&src);
    let dst = StateRegistry::new();
    let known = Arc::new(Scripted::sink());
    let _k = dst.register("known", None, 1, known.clone()).unwrap();
    let err = dst.load(&mut stream.as_slice()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownSection);
    assert_eq!(err.member(), Some("mystery"));
    assert!(
        err.to_string()
            .contains("unknown state 'mystery' instance 0"),
        "{err}"
    );
    assert!(known.loaded().is_empty());

    // Same id, other instance: also unknown.
    let dst2 = StateRegistry::new();
    let _k = dst2
        .register("known", Some(1), 1, Arc::new(Scripted::sink()))
        .unwrap();
    let _m = dst2
        .register("mystery", Some(0), 1, Arc::new(Scripted::sink()))
        .unwrap();
    assert_eq!(
        dst2.load(&mut stream.as_slice()).unwrap_err().kind(),
        ErrorKind::UnknownSection
    );
}

#[test]
fn newer_version_refused_older_accepted() {
    let src = StateRegistry::new();
    let _a = src
        .register("dev", None, 4, Arc::new(Scripted::new(b"s", &[], b"c")))
        .unwrap();
    let stream = save(&src);

    let old = StateRegistry::new();
    let p = Arc::new(Scripted::sink());
    let _h = old.register("dev", None, 3, p.clone()).unwrap();
    let err = old.load(&mut stream.as_slice()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NewerVersion);
    let msg = err.to_string();
    assert!(
        msg.contains("'dev'") && msg.contains("version 4") && msg.contains("version 3"),
        "{msg}"
    );
    assert!(p.loaded().is_empty());

    let new = StateRegistry::new();
    let q = Arc::new(Scripted::sink());
    let _h = new.register("dev", None, 9, q.clone()).unwrap();
    new.load(&mut stream.as_slice()).unwrap();
    assert_eq!(
        q.loaded(),
        vec![
            (SectionKind::Setup, 0, 4, b"s".to_vec()),
            (SectionKind::Complete, 0, 4, b"c".to_vec()),
        ]
    );
}

#[test]
fn truncation_and_corruption_are_errors() {
    let src = StateRegistry::new();
    let _a = src
        .register(
            "dev",
            None,
            1,
            Arc::new(Scripted::new(b"abc", &[b"d"], b"e")),
        )
        .unwrap();
    let stream = save(&src);
    let dst = StateRegistry::new();
    let p = Arc::new(Scripted::sink());
    let _h = dst.register("dev", None, 1, p.clone()).unwrap();
    for len in 0..stream.len() {
        let err = dst.load(&mut &stream[..len]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Truncated, "prefix {len}: {err}");
    }
    let mut bad = stream.clone();
    bad[0] ^= 0xff;
    assert_eq!(
        dst.load(&mut bad.as_slice()).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let mut bad = stream.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let err = dst.load(&mut bad.as_slice()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("stream checksum"), "{err}");
    assert!(p.loaded().is_empty());
}

/// A hand-made section header with a valid checksum that claims a payload
/// beyond the maximum.
#[test]
fn oversized_section_refused_without_allocating() {
    let mut s = Vec::new();
    s.extend_from_slice(&replication_core::MAGIC);
    s.extend_from_slice(&replication_core::FORMAT_VERSION.to_be_bytes());
    let mut hdr = Vec::new();
    hdr.extend_from_slice(b"SECT");
    hdr.push(1);
    hdr.push(3);
    hdr.extend_from_slice(&0u32.to_be_bytes());
    hdr.extend_from_slice(&1u32.to_be_bytes());
    hdr.extend_from_slice(&(MAX_SECTION_PAYLOAD + 1).to_be_bytes());
    let crc = crc32fast::hash(&hdr);
    hdr.extend_from_slice(&crc.to_be_bytes());
    s.extend_from_slice(&hdr);
    let dst = StateRegistry::new();
    let err = dst.load(&mut s.as_slice()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");

    // At the maximum the length is accepted, and a short stream is truncation.
    let n = s.len();
    s[n - 8..n - 4].copy_from_slice(&MAX_SECTION_PAYLOAD.to_be_bytes());
    let crc = crc32fast::hash(&s[n - 22..n - 4]);
    s[n - 4..].copy_from_slice(&crc.to_be_bytes());
    s.extend_from_slice(b"devxyz");
    let err = dst.load(&mut s.as_slice()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Truncated, "{err}");
}

#[test]
fn save_refuses_oversized_payload() {
    let reg = StateRegistry::new();
    let big = vec![0u8; MAX_SECTION_PAYLOAD as usize + 1];
    let p = Arc::new(Scripted::new(b"", &[], &big));
    let _h = reg.register("big", None, 1, p.clone()).unwrap();
    let err = reg.save(&mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    assert_eq!(p.cleanups(), 1);
}

#[test]
fn handler_failures_name_participant_and_clean_up() {
    for phase in [SavePhase::Setup, SavePhase::Iterate, SavePhase::Complete] {
        let reg = StateRegistry::new();
        let ok = Arc::new(Scripted::new(b"", &[b"x"], b""));
        let mut bad = Scripted::new(b"", &[b"y"], b"");
        bad.fail = Some(phase);
        let bad = Arc::new(bad);
        let _a = reg.register("ok", None, 1, ok.clone()).unwrap();
        let _b = reg.register("bad", None, 1, bad.clone()).unwrap();
        let err = reg.save(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Participant);
        assert_eq!(err.member(), Some("bad"));
        assert!(
            err.to_string().contains(&format!("failed in {phase}")),
            "{err}"
        );
        assert_eq!(ok.cleanups(), 1, "{phase}");
        assert_eq!(bad.cleanups(), 1, "{phase}");
    }

    let src = StateRegistry::new();
    let _a = src
        .register("dev", None, 1, Arc::new(Scripted::sink()))
        .unwrap();
    let stream = save(&src);
    let dst = StateRegistry::new();
    let mut p = Scripted::sink();
    p.fail = Some(SavePhase::Load);
    let _h = dst.register("dev", None, 1, Arc::new(p)).unwrap();
    let err = dst.load(&mut stream.as_slice()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Participant);
    assert!(
        err.to_string().contains("'dev' instance 0 failed in load"),
        "{err}"
    );
}

#[test]
fn inactive_participants_write_nothing() {
    let reg = StateRegistry::new();
    let mut p = Scripted::new(b"s", &[b"i"], b"c");
    p.active = false;
    let p = Arc::new(p);
    let _h = reg.register("idle", None, 1, p.clone()).unwrap();
    let mut out = Vec::new();
    assert_eq!(reg.save(&mut out).unwrap(), 0);
    assert_eq!(p.cleanups(), 0);
    // An empty checkpoint loads into an empty registry.
    assert_eq!(StateRegistry::new().load(&mut out.as_slice()).unwrap(), 0);
}

#[test]
fn iterate_rounds_are_bounded() {
    let reg = StateRegistry::new();
    reg.set_max_iterate_rounds(2);
    let parts: Vec<&[u8]> = vec![b"1", b"2", b"3", b"4"];
    let p = Arc::new(Scripted::new(b"", &parts, b""));
    let _h = reg.register("slow", None, 1, p.clone()).unwrap();
    // setup + 2 iterate + complete.
    assert_eq!(reg.save(&mut Vec::new()).unwrap(), 4);
    assert_eq!(p.parts.lock().len(), 2);
}

#[test]
fn back_to_back_checkpoints_on_one_reader() {
    let src = StateRegistry::new();
    let _a = src
        .register("dev", None, 1, Arc::new(Scripted::new(b"one", &[], b"")))
        .unwrap();
    let mut stream = save(&src);
    stream.extend(save(&src));
    let dst = StateRegistry::new();
    let p = Arc::new(Scripted::sink());
    let _h = dst.register("dev", None, 1, p.clone()).unwrap();
    let mut r = stream.as_slice();
    assert_eq!(dst.load(&mut r).unwrap(), 2);
    assert_eq!(dst.load(&mut r).unwrap(), 2);
    assert!(r.is_empty());
    assert_eq!(p.loaded().len(), 4);
}

#[test]
fn write_errors_are_reported() {
    struct Broken;
    impl std::io::Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let reg = StateRegistry::new();
    let p = Arc::new(Scripted::sink());
    let _h = reg.register("dev", None, 1, p.clone()).unwrap();
    let err = reg.save(&mut Broken).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains("disk on fire"), "{err}");
}
