//! The `arbor` command line as a user runs it.

use std::process::Command;

fn arbor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_arbor"))
}

#[test]
fn search_json_reports_answer_path_and_every_cost() {
    let dir = std::env::temp_dir().join(format!("arbor-cli-search-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (dot, tree) = (dir.join("tree.dot"), dir.join("tree.json"));
    let out = arbor()
        .args([
            "search",
            "--strategy",
            "majority",
            "--n",
            "2",
            "--budget-tokens",
            "400",
            "--max-step-tokens",
            "64",
            "--json",
        ])
        .arg("--dot")
        .arg(&dot)
        .arg("--tree-json")
        .arg(&tree)
        .arg("Tom has 3 boxes with 4 pencils in each box. How many pencils does Tom have?")
        .output()
        .unwrap();
    let dot = std::fs::read_to_string(&dot).unwrap();
    assert!(dot.contains("digraph") && dot.contains("->"), "{dot}");
    let tree: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tree).unwrap()).unwrap();
    assert!(
        tree["nodes"].as_array().is_some_and(|n| n.len() > 2),
        "{tree}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    for key in [
        "generated_tokens",
        "prompt_tokens_computed",
        "prompt_tokens_reused",
        "prm_tokens_computed",
        "policy_calls",
        "nodes",
        "wall_ms",
    ] {
        assert!(v["costs"][key].is_u64(), "costs.{key} missing: {v}");
    }
    assert!(v["costs"]["generated_tokens"].as_u64().unwrap() > 0);
    assert!(v["path"].as_array().is_some_and(|p| !p.is_empty()), "{v}");
    let answer = v["answer"].as_str().expect("an answer");
    assert!(!answer.is_empty());
}

#[test]
fn generate_streams_text_to_stdout_and_statistics_to_stderr() {
    let out = arbor()
        .args(["generate", "--prompt", "1, 2, 3, 4,", "--max-tokens", "6"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains('5'),
        "greedy continuation of a count: {text:?}"
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("tok/s") && err.contains("6 generated"),
        "{err}"
    );
}

#[test]
fn device_gpu_runs_on_a_gpu_or_says_why_not() {
    let out = arbor()
        .args([
            "generate",
            "--prompt",
            "1, 2, 3,",
            "--max-tokens",
            "3",
            "--device",
            "gpu",
        ])
        .env_remove("ARBOR_WGPU_ALLOW_SOFTWARE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if out.status.success() {
        // A hardware GPU: the statistics line names the backend.
        assert!(err.contains("backend wgpu"), "{err}");
    } else {
        // No hardware GPU (CI has only Mesa's software driver): the error says why and what
        // to do instead.
        assert!(err.contains("--device gpu"), "{err}");
        assert!(
            (err.contains("software renderer") && err.contains("ARBOR_WGPU_ALLOW_SOFTWARE"))
                || err.contains("no GPU adapter"),
            "{err}"
        );
        assert!(err.contains("--device cpu"), "{err}");
    }
}

#[test]
fn bad_input_gets_a_precise_error_and_a_failure_status() {
    let check = |args: &[&str], needle: &str| {
        let out = arbor().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    };
    check(
        &[
            "generate",
            "--prompt",
            "hi",
            "--model",
            "/nonexistent/model.gguf",
        ],
        "/nonexistent/model.gguf",
    );
    check(&["generate", "--prompt", "hi", "--top-p", "0"], "top_p");
    check(&["search", "--strategy", "sideways", "q"], "sideways");
    check(&["search", "--budget-tokens", "0", "q"], "--budget-tokens");
    check(
        &["search", "--strategy", "best-of-n", "--n", "0", "q"],
        "--n",
    );
    check(
        &["search", "--max-step-tokens", "0", "q"],
        "max_step_tokens",
    );
    // The service commands.
    check(
        &["search", "--coordinator", "http://127.0.0.1:1", "q"],
        "--coordinator http://127.0.0.1:1: cannot connect",
    );
    check(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "dns://no-port",
        ],
        "--workers",
    );
    check(&["worker", "--listen", "not-an-address"], "--listen");
    // TLS files are checked before any model loads or any port opens.
    check(
        &[
            "worker",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ],
        "--tls-cert /nonexistent/cert.pem",
    );
    check(
        &["worker", "--tls-cert", "/nonexistent/cert.pem"],
        "--tls-cert needs --tls-key",
    );
    check(
        &[
            "serve",
            "--workers",
            "https://127.0.0.1:1",
            "--workers-tls-ca",
            "/nonexistent/ca.pem",
        ],
        "--workers-tls-ca /nonexistent/ca.pem",
    );
    check(
        &[
            "search",
            "--coordinator",
            "http://127.0.0.1:1",
            "--tls-ca",
            "/dev/null",
            "q",
        ],
        "--tls-ca /dev/null: no PEM block",
    );
    let dir = std::env::temp_dir().join(format!("arbor-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("not-a-model.gguf");
    std::fs::write(&bad, b"definitely not GGUF").unwrap();
    check(
        &[
            "generate",
            "--prompt",
            "hi",
            "--model",
            bad.to_str().unwrap(),
        ],
        "not a GGUF file",
    );
    let cfg = dir.join("search.json");
    std::fs::write(&cfg, r#"{"strategy": {"kind": "beam", "beam_widht": 4}}"#).unwrap();
    check(
        &["search", "--config", cfg.to_str().unwrap(), "q"],
        "beam_widht",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn printed_config_round_trips_through_config() {
    let out = arbor()
        .args([
            "search",
            "--strategy",
            "beam",
            "--budget-tokens",
            "300",
            "--print-config",
            "q",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = std::env::temp_dir().join(format!("arbor-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.json");
    std::fs::write(&path, &out.stdout).unwrap();
    let again = arbor()
        .args([
            "search",
            "--budget-tokens",
            "300",
            "--print-config",
            "--config",
        ])
        .arg(&path)
        .arg("q")
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(out.stdout, again.stdout);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["strategy"]["kind"], "beam");
    assert_eq!(v["budget"]["max_generated_tokens"], 300);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--tree-answer` sets the answer rule of each tree search, and of no sampling one.
#[test]
fn tree_answer_sets_each_tree_searchs_rule() {
    let config = |strategy: &str| -> serde_json::Value {
        let out = arbor()
            .args([
                "search",
                "--strategy",
                strategy,
                "--tree-answer",
                "share_vote",
            ])
            .args(["--print-config", "q"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(config("mcts")["strategy"]["final_answer"], "share_vote");
    assert_eq!(config("beam")["strategy"]["answer"], "share_vote");
    assert_eq!(config("dvts")["strategy"]["answer"], "share_vote");
    assert_eq!(config("majority")["strategy"]["kind"], "self_consistency");
    let out = arbor()
        .args(["search", "--tree-answer", "loudest", "q"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("share_vote"));
}

#[test]
fn help_teaches_the_commands() {
    let out = arbor().args(["search", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--strategy",
        "--budget-tokens",
        "--json",
        "mcts",
        "best-of-n",
        "Examples",
    ] {
        assert!(help.contains(needle), "search --help lacks {needle}");
    }
    for (cmd, needles) in [
        ("serve", &["--workers", "dns://", "Examples"][..]),
        ("worker", &["--listen", "--calls-in-flight-max"][..]),
    ] {
        let out = arbor().args([cmd, "--help"]).output().unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        for needle in needles {
            assert!(help.contains(needle), "{cmd} --help lacks {needle}");
        }
    }
}

#[test]
fn prm_options_explain_themselves() {
    let out = arbor()
        .args(["search", "--prm", "oracle", "What is 2 + 2?"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a PRM kind (judge, rollout, log_prob)"),
        "{err}"
    );
    let out = arbor().args(["prm", "train", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--rollouts",
        "--samples",
        "--questions",
        "--budget-tokens",
        "held out",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let out = arbor().args(["search", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--prm head.safetensors"), "{help}");
}

/// `arbor prm train` keeps its labels as it makes them and resumes: a second run with more
/// questions labels only the new one. It refuses the development split and a store made with
/// other options, naming them. The real model, on a few short samples.
#[test]
fn prm_train_resumes_its_labels_and_keeps_off_the_development_split() {
    let dir = std::env::temp_dir().join(format!("arbor-prm-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // 600 GSM8K-style questions: with the default guard, the last 500 stand for the
    // development split.
    let dataset = dir.join("q.jsonl");
    let lines: Vec<String> = (0..600)
        .map(|i| {
            let (a, b) = (i % 17 + 2, i % 5 + 3);
            serde_json::json!({
                "question": format!("Tom has {a} bags with {b} apples each. How many apples does he have?"),
                "answer": format!("{a} * {b} = {}\n#### {}", a * b, a * b),
            })
            .to_string()
        })
        .collect();
    std::fs::write(&dataset, lines.join("\n") + "\n").unwrap();
    let out = dir.join("head.safetensors");
    let run_to = |questions: &str, samples: &str, out: &std::path::Path, extra: &[&str]| {
        arbor()
            .args(["prm", "train", "--dataset", dataset.to_str().unwrap()])
            .args([
                "--offset",
                "0",
                "--questions",
                questions,
                "--samples",
                samples,
            ])
            .args([
                "--rollouts",
                "1",
                "--max-tokens",
                "40",
                "--rollout-max-tokens",
                "24",
            ])
            .args(["--steps-per-solution", "1", "--device", "cpu"])
            .args(["--out", out.to_str().unwrap()])
            .args(extra)
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap()
    };
    let run = |questions: &str, samples: &str| run_to(questions, samples, &out, &[]);
    let done_lines = || {
        std::fs::read_to_string(out.with_extension("steps.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("{\"done\""))
            .count()
    };
    let first = run("1", "2");
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err}");
    assert_eq!(done_lines(), 1);
    let features = std::fs::metadata(out.with_extension("features.f32"))
        .unwrap()
        .len();
    assert!(
        features > 0 && features % (896 * 4) == 0,
        "{features} bytes of hidden states"
    );
    let second = run("2", "2");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err}");
    assert!(
        err.contains("resuming: 1 questions already labelled"),
        "{err}"
    );
    assert_eq!(done_lines(), 2, "only the new question was labelled");
    // Another head from the same labels (`--labels`), with its data fingerprinted, and a
    // ranking loss among each question's final steps.
    let soft = dir.join("soft.safetensors");
    let labels = [
        "--target",
        "soft",
        "--pairwise",
        "5",
        "--labels",
        out.to_str().unwrap(),
    ];
    let again = run_to("2", "2", &soft, &labels);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(
        err.contains("resuming: 2 questions already labelled"),
        "{err}"
    );
    assert_eq!(done_lines(), 2, "nothing was labelled again");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(soft.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(report["target"], "soft");
    assert_eq!(
        report["labels_sha256"].as_str().unwrap().len(),
        64,
        "{report}"
    );
    assert!(
        report["fit"]["epochs_run"].as_u64().unwrap() > 0,
        "{report}"
    );
    // How the head chooses among each question's samples, beside the oracle.
    for set in ["train", "validation", "held_out"] {
        let s = &report[set]["selection"];
        let oracle = s["oracle"].as_f64().unwrap();
        for rule in ["majority", "weighted_best_of_n", "best_of_n"] {
            let v = s[rule]
                .as_f64()
                .unwrap_or_else(|| panic!("{set} {rule}: {report}"));
            assert!(
                (0.0..=oracle).contains(&v),
                "{set} {rule} {v} > oracle {oracle}"
            );
        }
    }
    let negative = run_to(
        "2",
        "2",
        &dir.join("neg.safetensors"),
        &["--pairwise=-1", "--labels", out.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&negative.stderr);
    assert!(!negative.status.success());
    assert!(
        err.contains("--pairwise -1: give a weight of 0 or more"),
        "{err}"
    );
    // The held-out reliability plot, as PNG and SVG beside the head.
    let png = std::fs::read(dir.join("soft.reliability.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(dir.join("soft.reliability.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("held-out steps"),
        "{svg}"
    );
    // A store of two layers side by side, and a head on one of them.
    let mid = dir.join("mid.safetensors");
    let layers = [
        "--layers",
        "block.11,final_norm",
        "--head-layers",
        "block.11",
    ];
    let two = run_to("1", "2", &mid, &layers);
    let err = String::from_utf8_lossy(&two.stderr);
    assert!(two.status.success(), "{err}");
    let features = std::fs::metadata(mid.with_extension("features.f32"))
        .unwrap()
        .len();
    assert!(
        features > 0 && features % (2 * 896 * 4) == 0,
        "{features} bytes of hidden states at two layers"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(mid.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(report["layers"], "block.11");
    let absent = [
        "--layers",
        "block.11,final_norm",
        "--head-layers",
        "block.3",
    ];
    let refused = run_to("1", "2", &dir.join("absent.safetensors"), &absent);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("--head-layers: block.3 is not among"), "{err}");
    // Other options than the store was made with.
    let other = run("2", "3");
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success());
    assert!(err.contains("`samples` (2 there, 3 now)"), "{err}");
    // Questions in the development split.
    let dev = arbor()
        .args(["prm", "train", "--dataset", dataset.to_str().unwrap()])
        .args(["--offset", "90", "--questions", "20"])
        .args(["--out", dir.join("other.safetensors").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&dev.stderr);
    assert!(!dev.status.success());
    assert!(err.contains("development split"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A head shipped with Arbor is chosen by name (`--prm arbor-gsm8k-v1`), with its provenance
/// beside it in `heads/`, and a policy of another shape is refused, naming both.
#[test]
fn builtin_heads_are_chosen_by_name_and_refuse_another_policy() {
    let reports: [(&str, &str, &[u8]); 2] = [
        (
            "arbor-gsm8k-v0",
            include_str!("../heads/arbor-gsm8k-v0.json"),
            include_bytes!("../heads/arbor-gsm8k-v0.safetensors"),
        ),
        (
            "arbor-gsm8k-v1",
            include_str!("../heads/arbor-gsm8k-v1.json"),
            include_bytes!("../heads/arbor-gsm8k-v1.safetensors"),
        ),
    ];
    let home = std::env::temp_dir().join(format!("arbor-builtin-head-{}", std::process::id()));
    let tiny = home.join("tiny");
    arbor_model::tiny::TinyModel::new("qwen2")
        .write(&tiny)
        .unwrap();
    for (name, report, bytes) in reports {
        let report: serde_json::Value = serde_json::from_str(report).unwrap();
        assert!(report["command"]
            .as_str()
            .unwrap()
            .contains("arbor prm train"));
        assert_eq!(report["labels_sha256"].as_str().unwrap().len(), 64);
        assert_eq!(
            report["model_sha256"],
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
        );
        let out = arbor()
            .args(["search", "--model", tiny.to_str().unwrap(), "--prm", name])
            .args(["--budget-tokens", "16", "What is 2 + 2?"])
            .env("ARBOR_HOME", &home)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!("{name}.safetensors"))
                && err.contains("but the policy is 2 layers of width 64"),
            "{err}"
        );
        // Written once under $ARBOR_HOME/heads, byte for byte the shipped file.
        let written = std::fs::read(home.join(format!("heads/{name}.safetensors"))).unwrap();
        assert_eq!(written, bytes);
    }
    // v1 reads five layers of the policy, and was held out from questions it never saw.
    let v1: serde_json::Value =
        serde_json::from_str(include_str!("../heads/arbor-gsm8k-v1.json")).unwrap();
    assert_eq!(
        v1["layers"],
        "block.5,block.11,block.15,block.19,final_norm"
    );
    assert!(v1["held_out"]["questions"].as_u64().unwrap() >= 150, "{v1}");
    // The default model (from the usual cache, where the head goes too) takes it, and the
    // search values its steps with it.
    let out = arbor()
        .args([
            "search",
            "--prm",
            "arbor-gsm8k-v1",
            "--strategy",
            "best-of-n",
            "--n",
            "2",
        ])
        .args(["--budget-tokens", "120", "--json", "What is 2 + 2?"])
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        result["costs"]["prm_tokens_computed"].as_u64().unwrap() > 0,
        "{result}"
    );
    std::fs::remove_dir_all(&home).ok();
}
