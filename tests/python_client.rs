//! An independent client, written in Python with grpcio and not in Rust, gets what issue 18
//! promises from real `arbor worker` and `arbor serve` processes
//! (`clients/python/walkthrough.py`; it generates its stubs from `proto/arbor/v1/arbor.proto` at
//! run time). It checks these, asserting each:
//! - a 6,000-token `Score` step is refused at once, naming the field and the limit;
//! - a 2,000-token step is answered while the worker's resident memory grows by a bounded
//!   amount, and the worker keeps serving;
//! - calls without a token get UNAUTHENTICATED and health stays open;
//! - one client cannot read or cancel another's search (NOT_FOUND);
//! - `/metrics` on both servers counts the searches and calls made;
//! - a worker stopped with SIGSTOP mid-search is detected within seconds, and the search ends
//!   with the healthy run's result;
//! - SIGTERM drains the coordinator: health NOT_SERVING, new searches UNAVAILABLE, the running
//!   search completes with its answer, and the process exits 0.
//!
//! The script needs python3 with `grpcio`, `grpcio-tools` and `grpcio-health-checking`.
//! Without them this test is skipped, saying so, except under `CI=true` (`.ci/run` installs
//! them), where their absence fails.

use std::path::Path;
use std::process::Command;

const PACKAGES: &str = "grpcio grpcio-tools grpcio-health-checking";

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| v != "0" && v != "false")
}

/// Whether python3 can import what the walkthrough needs: Err says why not.
fn python_has_grpc() -> Result<(), String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import grpc, grpc_tools.protoc, grpc_health.v1.health_pb2",
        ])
        .output()
        .map_err(|e| format!("python3 cannot be run ({e})"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let last = stderr.lines().last().unwrap_or("the import failed");
    Err(last.to_string())
}

#[test]
fn the_python_client_walkthrough_passes_against_real_processes() {
    if let Err(why) = python_has_grpc() {
        if in_ci() {
            panic!(
                "CI: python3 lacks the walkthrough's packages ({why}); \
                 .ci/run installs them: `python3 -m pip install {PACKAGES}`"
            );
        }
        println!(
            "skipped: python3 lacks the walkthrough's packages ({why}); \
             `python3 -m pip install {PACKAGES}` (CI installs them)"
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("clients/python/walkthrough.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--arbor", env!("CARGO_BIN_EXE_arbor")])
        .current_dir(root)
        .env_remove("ARBOR_TOKEN")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "the walkthrough failed ({}):\n{stdout}{stderr}",
        out.status
    );
    assert!(
        stdout.contains("all checks passed"),
        "the walkthrough exited 0 without passing its checks:\n{stdout}"
    );
}
