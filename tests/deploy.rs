//! The Kubernetes manifests in `deploy/kubernetes/` stay valid and in step with the binary:
//! every `--flag` they pass exists on its command, and the manifests validate offline against
//! the Kubernetes schemas (`kubernetes-validate`, from the Python package index). Without that
//! tool the schema check is skipped, saying so, except under `CI=true` (`.ci/run` installs it),
//! where its absence fails.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes version the manifests must be valid for: the oldest one they target (gRPC
/// probes are generally available from 1.27).
const KUBERNETES_VERSION: &str = "1.29.0";

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| v != "0" && v != "false")
}

/// Each container's `args:` list: (file, the `arbor` subcommand, its `--flags`).
fn container_args() -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if line.trim() != "args:" {
                continue;
            }
            let mut items = Vec::new();
            while let Some(next) = lines.peek() {
                match next.trim().strip_prefix("- ") {
                    Some(item) => items.push(item.to_string()),
                    None => break,
                }
                lines.next();
            }
            let (command, flags) = items.split_first().expect("args name a command");
            let flags = flags
                .iter()
                .map(|f| f.split('=').next().unwrap().to_string())
                .collect();
            out.push((name.clone(), command.clone(), flags));
        }
    }
    out
}

#[test]
fn every_flag_the_manifests_pass_exists_on_its_command() {
    let args = container_args();
    let commands: Vec<&str> = args.iter().map(|(_, c, _)| c.as_str()).collect();
    assert!(
        commands.contains(&"serve") && commands.iter().filter(|c| **c == "worker").count() >= 2,
        "a coordinator and CPU and GPU workers: {commands:?}"
    );
    for (file, command, flags) in args {
        let help = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args([command.as_str(), "--help"])
            .output()
            .unwrap();
        assert!(help.status.success(), "{file}: arbor {command} --help");
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in flags {
            assert!(flag.starts_with("--"), "{file}: `{flag}` is not a --flag");
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{file}: arbor {command} has no {flag}"
            );
        }
    }
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schemas() {
    let files = manifests();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for want in [
        "coordinator.yaml",
        "workers.yaml",
        "workers-gpu.yaml",
        "secret.yaml",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    let run = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .args(&files)
        .output();
    let out = match run {
        Ok(out) => out,
        Err(e) if !in_ci() => {
            println!(
                "skipped: kubernetes-validate is not installed ({e}); \
                 `python3 -m pip install kubernetes-validate` (CI installs it)"
            );
            return;
        }
        Err(e) => {
            panic!("CI: kubernetes-validate is not installed ({e}); .ci/run installs it with pip")
        }
    };
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the manifests do not validate:\n{report}"
    );
    assert!(!report.contains("ERROR"), "{report}");
}
