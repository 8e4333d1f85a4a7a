//! Bad input gives precise errors and leaves the engine as it was.

use std::io::Write;

use arbor_model::{EngineOptions, GenRequest, Model, ModelError, SamplingParams};

use crate::{engine, engine_with, model};

#[test]
fn bad_requests_are_rejected_without_changing_state() {
    let mut e = engine();
    let s = e.new_sequence();
    e.forward(&[(s, &[1, 2, 3])]).unwrap();
    let vocab = model().config.vocab_size as u32;
    let check = |r: Result<&[f32], ModelError>, field: &str| match r {
        Err(ModelError::InvalidRequest { field: f, .. }) => assert_eq!(f, field),
        Err(other) => panic!("expected InvalidRequest({field}), got {other}"),
        Ok(_) => panic!("expected InvalidRequest({field}), got logits"),
    };
    check(e.forward(&[(s, &[vocab])]), "tokens");
    check(e.forward(&[(s, &[])]), "tokens");
    check(e.forward(&[(s, &[1]), (s, &[2])]), "entries");
    let gone = e.new_sequence();
    e.free(gone);
    check(e.forward(&[(gone, &[1])]), "seq");
    assert_eq!(e.seq_len(s), Some(3), "failed requests appended nothing");
    let too_long = vec![1u32; model().config.context_length];
    check(e.forward(&[(s, &too_long)]), "tokens");
    assert!(e.fork(gone).is_err());
    let bad = GenRequest {
        prompt: vec![1],
        n: 0,
        max_tokens: 4,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        prefix: None,
        keep_sequences: false,
    };
    let err = arbor_model::generate::generate(&mut e, &model().tokenizer, &[bad], |_, _, _| {})
        .unwrap_err();
    assert!(err.to_string().contains("n:"), "{err}");
}

#[test]
fn a_full_kv_cache_fails_cleanly() {
    let mut e = engine_with(EngineOptions {
        kv_blocks_max: 2,
        batch_tokens_max: 512,
    });
    let s = e.new_sequence();
    e.forward(&[(s, &[1; 20])]).unwrap();
    let err = e.forward(&[(s, &[1; 20])]).unwrap_err();
    assert!(
        matches!(err, ModelError::KvCacheFull { limit: 2, .. }),
        "{err}"
    );
    assert_eq!(e.seq_len(s), Some(20));
    // Still usable within the limit.
    e.forward(&[(s, &[1; 4])]).unwrap();
    assert_eq!(e.seq_len(s), Some(24));
}

#[test]
fn truncated_and_corrupt_gguf_files_give_errors_not_panics() {
    let path = arbor_model::fetch::ensure_default_model(&mut |_| {}).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let dir = std::env::temp_dir().join(format!("arbor-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(data).unwrap();
        p
    };
    // Header and metadata intact, tensor data cut off.
    let err = Model::load(&write("truncated.gguf", &bytes[..8 << 20])).unwrap_err();
    assert!(
        matches!(err, ModelError::Tensor { .. }) && err.to_string().contains("beyond the end"),
        "{err}"
    );
    // Cut inside the metadata.
    let err = Model::load(&write("short.gguf", &bytes[..1000])).unwrap_err();
    assert!(
        matches!(err, ModelError::GgufParse { .. }) && err.to_string().contains("truncated"),
        "{err}"
    );
    // Not a GGUF file at all.
    let err = Model::load(&write("text.gguf", b"hello world, this is not a model")).unwrap_err();
    assert!(err.to_string().contains("not a GGUF file"), "{err}");
    // Every prefix of the header region parses to an error or succeeds; none panics.
    for cut in (0..4096).step_by(61) {
        let _ = arbor_model::gguf::parse_bytes(&bytes[..cut]);
    }
    // Flipped bytes in the header region must not panic either.
    for i in (8..4096).step_by(97) {
        let mut b = bytes[..1 << 20].to_vec();
        b[i] ^= 0xff;
        let _ = arbor_model::gguf::parse_bytes(&b);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
