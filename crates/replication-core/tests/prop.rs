//! Property tests (named `prop_*`, see the README): the member registry
//! against a simple model, and the checkpoint stream's round trip and error
//! detection. `PROPTEST_CASES` sets the number of cases (default 256).

mod common;

use std::sync::Arc;

use common::{Loaded, Scripted};
use parking_lot::Mutex;
use proptest::prelude::*;
use replication_core::{
    ErrorKind, OpError, RegistrationHandle, Registry, ReplicationMode, ReplicationOp,
    ReplicationOps, SectionKind, StateParticipant, StateRegistry,
};

const OPS: [ReplicationOp; 4] = [
    ReplicationOp::Start,
    ReplicationOp::Checkpoint,
    ReplicationOp::GetError,
    ReplicationOp::Stop,
];

#[derive(Debug, Clone)]
enum Step {
    Register { fail_on: Option<usize> },
    Unregister(usize),
    Call(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => proptest::option::weighted(0.3, 0..4usize).prop_map(|fail_on| Step::Register { fail_on }),
        2 => any::<usize>().prop_map(Step::Unregister),
        3 => (0..4usize).prop_map(Step::Call),
    ]
}

struct Member {
    name: String,
    fail_on: Option<ReplicationOp>,
    log: Arc<Mutex<Vec<(String, ReplicationOp)>>>,
}

impl Member {
    fn hit(&self, op: ReplicationOp) -> Result<(), OpError> {
        self.log.lock().push((self.name.clone(), op));
        match self.fail_on {
            Some(f) if f == op => Err("planned failure".into()),
            _ => Ok(()),
        }
    }
}

impl ReplicationOps for Member {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn start(&self, _: ReplicationMode) -> Result<(), OpError> {
        self.hit(ReplicationOp::Start)
    }
    fn checkpoint(&self) -> Result<(), OpError> {
        self.hit(ReplicationOp::Checkpoint)
    }
    fn get_error(&self) -> Result<(), OpError> {
        self.hit(ReplicationOp::GetError)
    }
    fn stop(&self, _: bool) -> Result<(), OpError> {
        self.hit(ReplicationOp::Stop)
    }
}

proptest! {
    /// Any sequence of register / unregister / `*_all` calls calls the same
    /// members, in the same order, with the same first error, as a model:
    /// a list walked newest first that stops at the first failing member.
    #[test]
    fn prop_registry_matches_model(steps in proptest::collection::vec(step(), 0..60)) {
        let reg = Registry::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        // Model: (name, fail_on) in registration order; real: the handles.
        let mut model: Vec<(String, Option<ReplicationOp>)> = Vec::new();
        let mut handles: Vec<RegistrationHandle> = Vec::new();
        for (n, step) in steps.into_iter().enumerate() {
            match step {
                Step::Register { fail_on } => {
                    let name = format!("m{n}");
                    let fail_on = fail_on.map(|i| OPS[i]);
                    handles.push(reg.register(Arc::new(Member {
                        name: name.clone(),
                        fail_on,
                        log: Arc::clone(&log),
                    })));
                    model.push((name, fail_on));
                }
                Step::Unregister(i) => {
                    if !model.is_empty() {
                        let i = i % model.len();
                        model.remove(i);
                        prop_assert!(handles.remove(i).remove());
                    }
                }
                Step::Call(i) => {
                    let op = OPS[i];
                    let result = match op {
                        ReplicationOp::Start => reg.start_all(ReplicationMode::Secondary),
                        ReplicationOp::Checkpoint => reg.checkpoint_all(),
                        ReplicationOp::GetError => reg.get_error_all(),
                        ReplicationOp::Stop => reg.stop_all(true),
                    };
                    let mut expected = Vec::new();
                    let mut expected_err = None;
                    for (name, fail_on) in model.iter().rev() {
                        expected.push((name.clone(), op));
                        if *fail_on == Some(op) {
                            expected_err = Some(name.clone());
                            break;
                        }
                    }
                    let called = std::mem::take(&mut *log.lock());
                    prop_assert_eq!(called, expected);
                    match (result, expected_err) {
                        (Ok(()), None) => {}
                        (Err(e), Some(name)) => {
                            prop_assert_eq!(e.kind(), ErrorKind::Member);
                            prop_assert_eq!(e.member(), Some(name.as_str()));
                        }
                        (got, want) => prop_assert!(false, "got {:?}, model says error from {:?}", got, want),
                    }
                }
            }
            prop_assert_eq!(reg.len(), model.len());
        }
    }
}

/// A participant to generate: id, explicit instance or next free, version,
/// and what setup, iterate and complete write.
type Spec = (String, Option<u32>, u32, Vec<u8>, Vec<Vec<u8>>, Vec<u8>);

fn spec() -> impl Strategy<Value = Spec> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..24);
    (
        "[a-z][a-z0-9:/-]{0,11}",
        proptest::option::of(0u32..4),
        0u32..6,
        bytes(),
        proptest::collection::vec(bytes(), 0..3),
        bytes(),
    )
}

/// Registers the specs (skipping duplicates), saves a checkpoint, and
/// registers matching sinks on a fresh registry. Returns the stream, the
/// destination, its sinks with the sections each must receive, and the
/// handles keeping everything registered.
#[allow(clippy::type_complexity)]
fn setup(
    specs: &[Spec],
) -> (
    Vec<u8>,
    StateRegistry,
    Vec<(Arc<Scripted>, Vec<Loaded>)>,
    Vec<replication_core::StateHandle>,
) {
    let src = StateRegistry::new();
    let dst = StateRegistry::new();
    let mut keep = Vec::new();
    let mut sinks = Vec::new();
    for (id, instance, version, s, parts, c) in specs {
        let part_refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let p = Arc::new(Scripted::new(s, &part_refs, c));
        let Ok(h) = src.register(id, *instance, *version, p as Arc<dyn StateParticipant>) else {
            continue;
        };
        let inst = h.instance();
        let mut want = vec![(SectionKind::Setup, inst, *version, s.clone())];
        want.extend(
            parts
                .iter()
                .map(|p| (SectionKind::Iterate, inst, *version, p.clone())),
        );
        want.push((SectionKind::Complete, inst, *version, c.clone()));
        let sink = Arc::new(Scripted::sink());
        keep.push(
            dst.register(
                id,
                Some(inst),
                *version,
                sink.clone() as Arc<dyn StateParticipant>,
            )
            .unwrap(),
        );
        keep.push(h);
        sinks.push((sink, want));
    }
    let mut stream = Vec::new();
    src.save(&mut stream).unwrap();
    (stream, dst, sinks, keep)
}

proptest! {
    /// Every section written by every participant arrives, unchanged and in
    /// order, at the participant registered under the same id and instance.
    #[test]
    fn prop_stream_round_trips(specs in proptest::collection::vec(spec(), 0..5)) {
        let (stream, dst, sinks, _keep) = setup(&specs);
        let expected_total: usize = sinks.iter().map(|(_, w)| w.len()).sum();
        let mut reader = stream.as_slice();
        let n = dst.load(&mut reader).unwrap();
        prop_assert!(reader.is_empty());
        prop_assert_eq!(n as usize, expected_total);
        for (sink, want) in &sinks {
            prop_assert_eq!(&sink.loaded(), want);
        }
    }

    /// Every proper prefix of a stream is refused as truncated, and every
    /// single-byte change anywhere is refused as corrupt; neither loads
    /// anything.
    #[test]
    fn prop_stream_detects_every_truncation_and_corruption(
        specs in proptest::collection::vec(spec(), 0..4),
        mask in 1u8..=255,
    ) {
        let (stream, dst, sinks, _keep) = setup(&specs);
        for len in 0..stream.len() {
            let err = dst.load(&mut &stream[..len]).unwrap_err();
            prop_assert_eq!(err.kind(), ErrorKind::Truncated, "prefix {}: {}", len, err);
        }
        let mut bad = stream.clone();
        for pos in 0..stream.len() {
            let m = mask.rotate_left(pos as u32 % 8);
            bad[pos] ^= m;
            let err = dst.load(&mut bad.as_slice()).unwrap_err();
            prop_assert_eq!(err.kind(), ErrorKind::Corrupt, "byte {} ^ {:#04x}: {}", pos, m, err);
            bad[pos] ^= m;
        }
        for (sink, _) in &sinks {
            prop_assert!(sink.loaded().is_empty());
        }
    }
}
