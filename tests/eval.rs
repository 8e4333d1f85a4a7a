//! `arbor eval` and `arbor distill` as a user runs them, with the real default model.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The first three GSM8K training questions, as GSM8K's JSONL writes them.
fn gsm8k_lines() -> String {
    [
        (
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
            "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
        ),
        (
            "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
            "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
        ),
        (
            "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How much more money does Betty need to buy the wallet?",
            "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\nThis means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5",
        ),
    ]
    .iter()
    .map(|(q, a)| serde_json::json!({"question": q, "answer": a}).to_string() + "\n")
    .collect()
}

const BUDGET: &str = "192";

fn arbor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_arbor"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("arbor-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn succeed(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what} failed: {}", stderr(&out));
    out
}

/// `arbor eval` on the small grid of this file, with `extra` arguments.
fn eval(dataset: &Path, out_dir: &Path, extra: &[&str]) -> Output {
    arbor()
        .arg("eval")
        .arg("--dataset")
        .arg(dataset)
        .arg("--out")
        .arg(out_dir)
        .args([
            "--strategies",
            "mcts,best-of-n",
            "--budgets",
            BUDGET,
            "--limit",
            "3",
            "--seed",
            "5",
            "--sample-chunk",
            "2",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn trace_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("traces.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every trace line is JSON"))
        .collect()
}

/// Decodes a PNG and returns its size and how many distinct colours it has.
fn decode_png(path: &Path) -> (u32, u32, usize) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    let bytes_per_pixel = info.line_size / info.width as usize;
    let colours: BTreeSet<&[u8]> = pixels[..info.buffer_size()]
        .chunks(bytes_per_pixel)
        .collect();
    (info.width, info.height, colours.len())
}

#[test]
fn eval_runs_the_grid_resumes_reports_and_distills() {
    let dir = temp_dir("grid");
    let dataset = dir.join("gsm8k-3.jsonl");
    std::fs::write(&dataset, gsm8k_lines()).unwrap();
    let out_dir = dir.join("out");

    // 1. The grid: 3 questions × 2 strategies × 1 budget.
    let first = succeed(eval(&dataset, &out_dir, &[]), "the first run");
    assert!(
        stderr(&first).contains("6 cells to run of 6"),
        "{}",
        stderr(&first)
    );
    // Without --concurrency, the CPU worker's default, said.
    assert!(
        stderr(&first).contains("2 searches in flight (this worker's default"),
        "{}",
        stderr(&first)
    );
    // The last line says how fast the worker generated, in how many passes of how many
    // tokens, and how much prompt it recomputed.
    let last = stderr(&first)
        .lines()
        .rfind(|l| l.starts_with("arbor eval: ran 6 cells"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("{}", stderr(&first)));
    assert!(
        last.contains("tokens/s generated in")
            && last.contains("passes/s of")
            && last.contains("prompt tokens computed per token"),
        "{last}"
    );
    let traces = trace_lines(&out_dir);
    assert_eq!(traces.len(), 6);
    let cells: BTreeSet<(u64, String)> = traces
        .iter()
        .map(|t| (t["index"].as_u64().unwrap(), t["strategy"].to_string()))
        .collect();
    assert_eq!(cells.len(), 6, "one line per cell: {cells:?}");
    for t in &traces {
        let costs = &t["costs"];
        for key in [
            "generated_tokens",
            "prompt_tokens_computed",
            "policy_calls",
            "nodes",
        ] {
            assert!(costs[key].as_u64().unwrap() > 0, "{key} in {t}");
        }
        for key in ["prompt_tokens_reused", "prm_tokens_computed", "wall_ms"] {
            assert!(costs[key].is_u64(), "{key} in {t}");
        }
        assert_eq!(t["budget"], 192);
        assert!(t["gold"].is_string() && t["question"].is_string());
        let derived = t["strategy"] == "best-of-n";
        assert_eq!(t["derived_from_samples"], derived, "{t}");
        if derived {
            // A sampler that stops at the budget spends it exactly (the cut sample included).
            assert_eq!(costs["generated_tokens"], 192, "{t}");
        }
        // An answer is marked correct exactly when it is the gold one.
        let correct = t["correct"].as_bool().unwrap();
        assert_eq!(
            correct,
            t["answer_key"].as_str() == t["gold"].as_str(),
            "{t}"
        );
        if correct {
            assert!(!t["path"].as_array().unwrap().is_empty(), "{t}");
        }
        // Every distinct final answer the cell reached: the chosen one among them, a right
        // one marked where the cell was right, no more votes than samples that fit.
        let found = t["candidates"].as_array().unwrap_or_else(|| panic!("{t}"));
        let keys: Vec<String> = found
            .iter()
            .map(|c| arbor_search::normalize(c["answer"].as_str().unwrap()))
            .collect();
        if let Some(key) = t["answer_key"].as_str() {
            assert!(keys.iter().any(|k| k == key), "{t}");
        }
        let distinct: BTreeSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "grouped by equivalence: {t}");
        if correct {
            assert!(found.iter().any(|c| c["correct"] == true), "{t}");
        }
        let votes: u64 = found.iter().map(|c| c["votes"].as_u64().unwrap()).sum();
        assert!(votes >= 1 || t["answer"].is_null(), "{t}");
        if derived {
            assert!(votes <= t["samples"].as_u64().unwrap(), "{t}");
        }
    }
    let samples = std::fs::read_to_string(out_dir.join("samples.jsonl")).unwrap();
    let covered: Vec<u64> = samples
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .fold(vec![0; 3], |mut by_question, chunk| {
            let i = chunk["index"].as_u64().unwrap() as usize;
            for s in chunk["samples"].as_array().unwrap() {
                by_question[i] += s["generated_tokens"].as_u64().unwrap();
            }
            by_question
        });
    assert!(covered.iter().all(|&c| c >= 192), "{covered:?}");

    // 2. Summary and plots.
    let csv = std::fs::read_to_string(out_dir.join("summary.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows[0].starts_with("strategy,budget,n,correct,accuracy,ci_low,ci_high,"));
    assert!(rows[1].starts_with("mcts,192,3,"), "{csv}");
    assert!(rows[2].starts_with("best-of-n,192,3,"), "{csv}");
    let md = std::fs::read_to_string(out_dir.join("summary.md")).unwrap();
    assert!(md.contains("| mcts | 192 | 3 |"), "{md}");
    assert!(md.contains("| best-of-n* | 192 | 3 |"), "{md}");
    assert_eq!(String::from_utf8_lossy(&first.stdout).trim(), md.trim());
    for stem in ["accuracy_vs_generated", "accuracy_vs_computed"] {
        let (width, height, colours) = decode_png(&out_dir.join(format!("{stem}.png")));
        assert_eq!((width, height), (960, 640));
        assert!(colours > 8, "{stem}.png looks blank: {colours} colours");
        let svg = std::fs::read_to_string(out_dir.join(format!("{stem}.svg"))).unwrap();
        assert!(svg.starts_with("<svg"), "{stem}.svg");
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        assert!(
            texts.contains(&"mcts") && texts.contains(&"best-of-n (from samples)"),
            "{stem}.svg lacks the legend"
        );
    }

    // 3. Resuming computes nothing new.
    let traces_before = std::fs::read(out_dir.join("traces.jsonl")).unwrap();
    let again = succeed(eval(&dataset, &out_dir, &[]), "the resumed run");
    assert!(
        stderr(&again).contains("0 cells to run of 6"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        std::fs::read(out_dir.join("traces.jsonl")).unwrap(),
        traces_before
    );

    // 4. Other settings are refused, naming what changed.
    let refused = eval(&dataset, &out_dir, &["--temperature", "0.9"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("temperature was 0.7, now 0.9"),
        "{}",
        stderr(&refused)
    );

    // 5. A kill mid-write: the cut line is ignored with a warning and only its cell runs again;
    // a best-of-n cell is re-derived from the stored samples, identically.
    let text = String::from_utf8(traces_before.clone()).unwrap();
    let (derived, others): (Vec<&str>, Vec<&str>) = text
        .lines()
        .partition(|l| l.contains(r#""strategy":"best-of-n""#));
    let victim = derived[0];
    let mut cut = others.join("\n") + "\n" + &derived[1..].join("\n") + "\n";
    cut.push_str(&victim[..victim.len() / 2]);
    std::fs::write(out_dir.join("traces.jsonl"), cut).unwrap();
    let resumed = succeed(eval(&dataset, &out_dir, &[]), "the run after a cut line");
    let log = stderr(&resumed);
    assert!(log.contains("ignoring a truncated last line"), "{log}");
    assert!(log.contains("1 cells to run of 6"), "{log}");
    let traces_after = trace_lines(&out_dir);
    assert_eq!(traces_after.len(), 6);
    let redone = traces_after.last().unwrap();
    assert_eq!(
        redone,
        &serde_json::from_str::<serde_json::Value>(victim).unwrap()
    );

    // 6. `report` redraws everything from the traces alone.
    for name in [
        "summary.csv",
        "summary.md",
        "accuracy_vs_generated.png",
        "accuracy_vs_generated.svg",
        "accuracy_vs_computed.png",
        "accuracy_vs_computed.svg",
    ] {
        std::fs::remove_file(out_dir.join(name)).unwrap();
    }
    succeed(
        arbor()
            .args(["eval", "report"])
            .arg(&out_dir)
            .output()
            .unwrap(),
        "report",
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("summary.csv")).unwrap(),
        csv
    );
    assert_eq!(decode_png(&out_dir.join("accuracy_vs_computed.png")).0, 960);
    assert!(out_dir.join("accuracy_vs_generated.svg").exists());

    // 7. Distill: one chat example per distinct correct path.
    let sft = dir.join("sft.jsonl");
    succeed(
        arbor()
            .args(["distill", "--traces"])
            .arg(&out_dir)
            .arg("--out")
            .arg(&sft)
            .output()
            .unwrap(),
        "distill",
    );
    let expected: BTreeSet<(String, String)> = traces_after
        .iter()
        .filter(|t| t["correct"] == true)
        .map(|t| {
            let steps: Vec<&str> = t["path"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().trim())
                .filter(|s| !s.is_empty())
                .collect();
            (
                t["question"].as_str().unwrap().to_owned(),
                steps.join("\n\n"),
            )
        })
        .collect();
    let examples: BTreeSet<(String, String)> = std::fs::read_to_string(&sft)
        .unwrap()
        .lines()
        .map(|l| {
            let e: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(e["messages"][0]["role"], "system");
            assert!(e["metadata"]["costs"]["generated_tokens"].as_u64().unwrap() > 0);
            (
                e["messages"][1]["content"].as_str().unwrap().to_owned(),
                e["messages"][2]["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(examples, expected);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A search whose worker calls fail (here: a KV cache of 2 blocks, too small for any prompt)
/// must not count as a wrong answer: its cells stay out of the traces, the run says so and
/// fails, and running the same command again (with room) retries exactly those cells.
#[test]
fn failed_worker_calls_leave_their_cells_out_and_a_rerun_retries_them() {
    let dir = temp_dir("failed");
    let data = dir.join("one.jsonl");
    std::fs::write(
        &data,
        gsm8k_lines().lines().next().unwrap().to_string() + "\n",
    )
    .unwrap();
    let out_dir = dir.join("out");
    let run = |extra: &[&str]| {
        arbor()
            .args(["eval", "--dataset", data.to_str().unwrap()])
            .args(["--out", out_dir.to_str().unwrap()])
            .args([
                "--strategies",
                "beam,best-of-n",
                "--budgets",
                "64",
                "--device",
                "cpu",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--kv-blocks", "2"]);
    assert!(!out.status.success(), "failed cells make the run fail");
    let err = stderr(&out);
    assert!(
        err.contains("searches failed because worker calls failed")
            && err.contains("KV cache is full")
            && err.contains("run the same command again"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(trace_lines(&out_dir).len(), 0, "no cell recorded as wrong");
    let out = succeed(run(&[]), "the rerun");
    let _ = out;
    let lines = trace_lines(&out_dir);
    assert_eq!(lines.len(), 2, "both cells ran on the second run");
    for l in &lines {
        assert!(l["costs"]["generated_tokens"].as_u64().unwrap() > 0, "{l}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_datasets_and_arguments_are_refused_before_any_model_work() {
    let dir = temp_dir("bad");
    let check = |args: &[&str], needle: &str| {
        let out = arbor().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = stderr(&out);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    };
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"question\": \"q\", \"answer\": \"#### 1\"}\n{\"question\": \"q\", \"answer\": \"no marker\"}\n",
    )
    .unwrap();
    let out = dir.join("out");
    let (bad, out) = (bad.to_str().unwrap(), out.to_str().unwrap());
    check(
        &["eval", "--dataset", bad, "--out", out],
        "bad.jsonl:2: the answer has no final `#### N` line",
    );
    check(
        &["eval", "--dataset", "/nonexistent.jsonl"],
        "/nonexistent.jsonl",
    );
    check(&["eval", "--out", out], "--dataset");
    check(
        &["eval", "--dataset", bad, "--strategies", "mcts,sideways"],
        "sideways",
    );
    check(
        &["eval", "--dataset", bad, "--budgets", "256,0"],
        "--budgets",
    );
    let good = dir.join("good.jsonl");
    std::fs::write(&good, "{\"question\": \"q\", \"answer\": \"#### 1\"}\n").unwrap();
    check(
        &[
            "eval",
            "--dataset",
            good.to_str().unwrap(),
            "--kv-blocks",
            "0",
            "--out",
            out,
        ],
        "--kv-blocks must be at least 1",
    );
    check(&["eval", "report", out], "no traces");
    check(&["distill", "--traces", out, "--out", out], "no traces");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_help_teaches_the_command() {
    let out = arbor().args(["eval", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--dataset",
        "--strategies",
        "--budgets",
        "--no-sample-reuse",
        "--concurrency",
        "--kv-blocks",
        "--prm",
        "logprob",
        "Examples",
        "arbor eval report",
    ] {
        assert!(help.contains(needle), "eval --help lacks {needle}");
    }
}
