//! Records the git revision for `arbor --version` and compiles `proto/` with protox (a pure-Rust
//! protobuf compiler, so no system `protoc` is needed) and tonic's code generator.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rev = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ARBOR_GIT_REV={rev}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    // HEAD names a branch; the revision changes when that branch's ref does.
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            // (A path that does not exist would make every build rerun this script.)
            for path in [format!(".git/{r}"), ".git/packed-refs".to_string()] {
                if std::path::Path::new(&path).exists() {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
        }
    }

    let protos = ["proto/arbor/v1/arbor.proto"];
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set also feeds gRPC reflection (`--reflection`).
    std::fs::write(
        out.join("arbor_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
