//! `arbor`: test-time search over reasoning steps, on a native transformer engine.

mod cli;
mod coordinator_client;
mod distill;
mod eval;
mod prm_cmd;
mod search_cmd;
mod serve_cmd;

fn main() -> std::process::ExitCode {
    // Probing for a GPU (`--device auto`) opens a Vulkan instance; with Mesa's drivers on a
    // headless machine, libwayland then prints "XDG_RUNTIME_DIR is invalid or not set" to
    // stderr. Give it a directory (as a login session would) before any thread starts.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    cli::main()
}
