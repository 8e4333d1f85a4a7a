//! A Hugging Face folder (config.json, safetensors, tokenizer.json) made here with the tiny
//! qwen2/llama model of [`arbor_model::tiny`], checked against its plain f32 reference.

use arbor_model::backend::cpu::CpuBackend;
use arbor_model::tiny::{TinyModel, D, EXTRA_0, KV_HEADS, VOCAB};
use arbor_model::{Engine, EngineOptions, ForwardEntry, HiddenLayer, Model, ModelError};

fn write_folder_for(dir: &std::path::Path, arch: &str) {
    TinyModel::new(arch).write(dir).unwrap();
}

fn write_folder(dir: &std::path::Path) {
    write_folder_for(dir, "qwen2");
}

fn reference_logits(tokens: &[u32], arch: &str) -> Vec<Vec<f32>> {
    TinyModel::new(arch).reference_logits(tokens)
}

fn engine_for(model: &Model) -> Engine {
    Engine::new(
        Box::new(CpuBackend::new(model.config.clone(), model.weights.clone())),
        EngineOptions::default(),
    )
}

#[test]
fn a_hugging_face_folder_loads_and_matches_a_plain_reference() {
    for arch in ["qwen2", "llama"] {
        check_folder(arch);
    }
}

fn check_folder(arch: &str) {
    let dir = std::env::temp_dir().join(format!("arbor-hf-test-{arch}-{}", std::process::id()));
    write_folder_for(&dir, arch);
    let model = Model::load(&dir).unwrap();
    assert_eq!(model.config.architecture, arch);
    assert_eq!(model.config.n_kv_heads, KV_HEADS);
    let tokens = model.tokenizer.encode("abc ab!", false).unwrap();
    assert!(tokens.contains(&256), "the merge `a b` applies: {tokens:?}");
    assert_eq!(model.tokenizer.decode(&tokens).unwrap(), "abc ab!");
    assert!(model.tokenizer.is_eos(257));
    let mut e = engine_for(&model);
    let s = e.new_sequence();
    let ours = e.forward_all_logits(&[(s, &tokens)]).unwrap().to_vec();
    let reference = reference_logits(&tokens, arch);
    let scale = reference.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let mut sum = 0f32;
    for (pos, row) in reference.iter().enumerate() {
        for (t, r) in row.iter().enumerate() {
            let o = ours[pos * VOCAB + t];
            sum += (o - r).abs();
            // Weights and activations are both quantized to 8 bits: errors of about 1% of the
            // logit scale, a few percent at worst; a wrong rotation or a swapped tensor moves
            // logits by the whole scale.
            assert!(
                (o - r).abs() <= 0.05 * scale,
                "{arch} position {pos} token {t}: {o} vs reference {r} (scale {scale})"
            );
        }
    }
    let mean = sum / (reference.len() * VOCAB) as f32;
    eprintln!("{arch}: mean |error| {mean:.4}, logit scale {scale:.2}");
    assert!(
        mean <= 0.01 * scale,
        "{arch}: mean error {mean} against scale {scale}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn broken_hugging_face_folders_name_the_problem() {
    let dir = std::env::temp_dir().join(format!("arbor-hf-broken-{}", std::process::id()));
    write_folder(&dir);
    // A missing tensor is named.
    let mut tiny = TinyModel::new("qwen2");
    tiny.remove("model.layers.1.mlp.up_proj.weight");
    tiny.write_safetensors(&dir.join("model.safetensors"))
        .unwrap();
    let err = Model::load(&dir).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor(n) if n == "model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
    // A truncated safetensors file is rejected with its path.
    let full = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &full[..full.len() / 2]).unwrap();
    let err = Model::load(&dir).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // An unsupported architecture is named.
    std::fs::write(dir.join("config.json"), r#"{"model_type": "mamba", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 288}"#).unwrap();
    let err = Model::load(&dir).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedArchitecture(a) if a == "mamba"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Final hidden states (after the final norm) match the plain reference, at any offsets of
/// any entry, in passes split by `batch_tokens_max`, with or without logits in the same pass;
/// and the logits `forward_at` returns are those of `forward_all_logits`.
#[test]
fn hidden_states_match_the_plain_reference_at_chosen_offsets() {
    let dir = std::env::temp_dir().join(format!("arbor-hf-hidden-{}", std::process::id()));
    write_folder(&dir);
    let tiny = TinyModel::new("qwen2");
    let model = Model::load(&dir).unwrap();
    let a = model.tokenizer.encode("abc ab! step one", false).unwrap();
    let mut b = model
        .tokenizer
        .encode("x<extra_0>yz<extra_0>", true)
        .unwrap();
    assert_eq!(b.iter().filter(|&&t| t == EXTRA_0).count(), 2, "{b:?}");
    b.insert(0, 7);
    let (ref_a, ref_b) = (tiny.reference_hidden(&a), tiny.reference_hidden(&b));
    let scale = ref_a
        .iter()
        .chain(&ref_b)
        .flatten()
        .fold(0f32, |m, v| m.max(v.abs()));
    let check = |what: &str, got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), D);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            // Weights and activations are quantized to 8 bits inside the blocks; reading a
            // hidden state before the final norm, or at the wrong token, is off by the scale.
            assert!(
                (g - w).abs() <= 0.05 * scale,
                "{what} element {i}: {g} vs reference {w} (scale {scale})"
            );
        }
    };
    for batch_tokens_max in [512, 5] {
        let mut e = Engine::new(
            Box::new(CpuBackend::new(model.config.clone(), model.weights.clone())),
            EngineOptions {
                batch_tokens_max,
                ..EngineOptions::default()
            },
        );
        let (sa, sb) = (e.new_sequence(), e.new_sequence());
        let sep: Vec<u32> = (0..b.len() as u32)
            .filter(|&i| b[i as usize] == EXTRA_0)
            .collect();
        let hidden_a = [0u32, 3, a.len() as u32 - 1];
        let logits_a = [a.len() as u32 - 1, 2];
        let out = e
            .forward_at(&[
                ForwardEntry {
                    seq: sa,
                    tokens: &a,
                    logits_at: &logits_a,
                    hidden_at: &hidden_a,
                    samples: &[],
                },
                ForwardEntry::hidden_at(sb, &b, &sep),
            ])
            .unwrap();
        let (logits, hidden) = (out.logits.to_vec(), out.hidden.to_vec());
        assert_eq!(hidden.len(), (hidden_a.len() + sep.len()) * D);
        assert_eq!(logits.len(), logits_a.len() * VOCAB);
        let rows: Vec<(&str, usize, &Vec<f32>)> = hidden_a
            .iter()
            .map(|&o| ("a", o as usize, &ref_a[o as usize]))
            .chain(sep.iter().map(|&o| ("b", o as usize, &ref_b[o as usize])))
            .collect();
        for (j, (which, off, want)) in rows.iter().enumerate() {
            let what = format!("batch {batch_tokens_max}, entry {which}, offset {off}");
            check(&what, &hidden[j * D..(j + 1) * D], want);
        }
        // The same tokens again, all logits: the rows forward_at returned are among them.
        let s2 = e.new_sequence();
        let all = e.forward_all_logits(&[(s2, &a)]).unwrap().to_vec();
        for (j, &o) in logits_a.iter().enumerate() {
            let o = o as usize;
            assert_eq!(
                &logits[j * VOCAB..(j + 1) * VOCAB],
                &all[o * VOCAB..(o + 1) * VOCAB],
                "logits at offset {o}"
            );
        }
        // forward_hidden: every position.
        let s3 = e.new_sequence();
        let every = e.forward_hidden(&[(s3, &a)]).unwrap().to_vec();
        for (o, want) in ref_a.iter().enumerate() {
            check(
                &format!("forward_hidden offset {o}"),
                &every[o * D..(o + 1) * D],
                want,
            );
        }
        // An offset outside the entry's tokens is refused and changes nothing.
        let s4 = e.new_sequence();
        let err = e
            .forward_at(&[ForwardEntry::hidden_at(s4, &a, &[a.len() as u32])])
            .unwrap_err();
        assert!(err.to_string().contains("offset"), "{err}");
        assert_eq!(e.seq_len(s4), Some(0));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Hidden states read after a middle block, and several layers at once, match the plain
/// reference; the engine refuses layers the model lacks and keeps its setting.
#[test]
fn hidden_states_of_any_layer_match_the_plain_reference() {
    let dir = std::env::temp_dir().join(format!("arbor-hf-layers-{}", std::process::id()));
    write_folder(&dir);
    let tiny = TinyModel::new("qwen2");
    let model = Model::load(&dir).unwrap();
    let a = model.tokenizer.encode("abc ab! step one", false).unwrap();
    let layers = [
        HiddenLayer::Block(0),
        HiddenLayer::Final,
        HiddenLayer::Block(1),
    ];
    let refs: Vec<Vec<Vec<f32>>> = layers
        .iter()
        .map(|&l| tiny.reference_hidden_at(&a, l))
        .collect();
    // A middle block's state differs from the final one: the test can tell them apart.
    assert!(refs[0][3]
        .iter()
        .zip(&refs[1][3])
        .any(|(x, y)| (x - y).abs() > 0.1));
    let mut e = engine_for(&model);
    for bad in [
        vec![],
        vec![HiddenLayer::Block(2)],
        vec![HiddenLayer::Final, HiddenLayer::Final],
    ] {
        let err = e.set_hidden_layers(&bad).unwrap_err();
        assert!(err.to_string().contains("hidden_layers"), "{err}");
        assert_eq!(e.hidden_layers(), &[HiddenLayer::Final]);
    }
    e.set_hidden_layers(&layers).unwrap();
    let s = e.new_sequence();
    let every = e.forward_hidden(&[(s, &a)]).unwrap().to_vec();
    assert_eq!(every.len(), a.len() * layers.len() * D);
    for (o, row) in every.chunks(layers.len() * D).enumerate() {
        for (k, got) in row.chunks(D).enumerate() {
            let want = &refs[k][o];
            // The tolerance of the final norm's test: 5% of the layer's largest element.
            let scale = refs[k].iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 0.05 * scale,
                    "{} offset {o} element {i}: {g} vs reference {w}",
                    layers[k]
                );
            }
        }
    }
    // The names round-trip.
    let list = HiddenLayer::list(&layers);
    assert_eq!(list, "block.0,final_norm,block.1");
    assert_eq!(HiddenLayer::parse_list(&list, 2).unwrap(), layers);
    for (bad, says) in [
        ("block.2", "block.0 to block.1"),
        ("layer.1", "neither"),
        ("block.1,block.1", "twice"),
    ] {
        let err = HiddenLayer::parse_list(bad, 2).unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fork of a longer sequence, truncated and extended, computes what a fresh sequence with the
/// same tokens computes, and leaves the sequence it was forked from as it was.
#[test]
fn a_truncated_fork_recomputes_exactly_and_leaves_its_parent_alone() {
    let dir = std::env::temp_dir().join(format!("arbor-hf-truncate-{}", std::process::id()));
    write_folder(&dir);
    let model = Model::load(&dir).unwrap();
    let mut e = engine_for(&model);
    let a = model
        .tokenizer
        .encode("abc ab! a longer text than one block", false)
        .unwrap();
    assert!(a.len() > 20, "spans two KV blocks");
    let parent = e.new_sequence();
    e.forward(&[(parent, &a)]).unwrap();
    let blocks = e.kv_blocks_in_use();
    for cut in [a.len() - 1, 16, 5] {
        let f = e.fork(parent).unwrap();
        e.truncate(f, cut).unwrap();
        assert_eq!(e.seq_len(f), Some(cut));
        let x = [a[cut], 9];
        let got = e.forward_all_logits(&[(f, &x)]).unwrap().to_vec();
        let fresh = e.new_sequence();
        let mut tokens = a[..cut].to_vec();
        tokens.extend_from_slice(&x);
        let all = e.forward_all_logits(&[(fresh, &tokens)]).unwrap().to_vec();
        assert_eq!(&got[..], &all[cut * VOCAB..], "cut at {cut}");
        e.free(f);
        e.free(fresh);
        assert_eq!(
            e.kv_blocks_in_use(),
            blocks,
            "cut at {cut}: only the parent's blocks left"
        );
    }
    // The parent still continues as if nothing happened.
    let next = e.forward(&[(parent, &[7])]).unwrap().to_vec();
    let fresh = e.new_sequence();
    let mut tokens = a.clone();
    tokens.push(7);
    let all = e.forward_all_logits(&[(fresh, &tokens)]).unwrap().to_vec();
    assert_eq!(&next[..], &all[a.len() * VOCAB..]);
    assert!(e.truncate(parent, a.len() + 5).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
