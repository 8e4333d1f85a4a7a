//! The documents a newcomer reads first stay short, and ARCHITECTURE.md names only files that
//! exist: a map that points at a moved file is worse than none.

use std::path::Path;

/// Characters a top-level document may hold: about ten minutes of reading.
const DOC_CHARS_MAX: usize = 12_000;

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(doc: &str) -> String {
    std::fs::read_to_string(repo_root().join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"))
}

/// The backticked spans of `text` that name a file or folder of the repository: no spaces, no
/// URL scheme, and either a `/` in them or a file extension the repository uses.
fn named_paths(text: &str) -> Vec<&str> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| {
            !span.is_empty()
                && !span.contains(char::is_whitespace)
                && !span.contains("://")
                && !span.contains("::")
                && (span.contains('/')
                    || [".rs", ".toml", ".proto", ".md", ".wgsl", ".py"]
                        .iter()
                        .any(|ext| span.ends_with(ext)))
        })
        .collect()
}

/// The paths among `paths` that do not exist under the repository root.
fn missing(paths: &[&str]) -> Vec<String> {
    paths
        .iter()
        .filter(|p| !repo_root().join(p.trim_end_matches('/')).exists())
        .map(|p| p.to_string())
        .collect()
}

#[test]
fn top_level_documents_stay_short() {
    for doc in ["ARCHITECTURE.md", "BENCHMARKS.md"] {
        let chars = read(doc).chars().count();
        assert!(
            chars <= DOC_CHARS_MAX,
            "{doc} has {chars} characters, over {DOC_CHARS_MAX}: move detail into the modules' \
             own docs (ARCHITECTURE.md) or drop history that git keeps (BENCHMARKS.md)"
        );
    }
}

#[test]
fn every_path_architecture_names_exists() {
    let text = read("ARCHITECTURE.md");
    let code_map = text
        .split_once("## Code map")
        .expect("ARCHITECTURE.md has a `## Code map` section")
        .1;
    let paths = named_paths(code_map);
    assert!(
        paths.len() >= 20,
        "too few paths found, is the code map there? {paths:?}"
    );
    let missing = missing(&paths);
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names paths that do not exist: {missing:?}"
    );
}

#[test]
fn path_detection() {
    // One helper, a table of cases: what counts as a path and what does not.
    let text = "`search/src/tree.rs` `Cargo.toml` `src/rpc/` `model::Engine` `dns://host:1` \
                `cargo tree -p x` `Policy` `proto/arbor/v1/arbor.proto`";
    assert_eq!(
        named_paths(text),
        [
            "search/src/tree.rs",
            "Cargo.toml",
            "src/rpc/",
            "proto/arbor/v1/arbor.proto"
        ]
    );
    assert_eq!(missing(&["src/rpc/", "Cargo.toml"]), Vec::<String>::new());
    assert_eq!(missing(&["src/no_such_file.rs"]), ["src/no_such_file.rs"]);
}
