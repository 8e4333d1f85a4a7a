//! `arbor`: test-time search over reasoning steps, on a native transformer engine.

mod cli;
mod distill;
mod eval;
mod prm_cmd;
mod search_cmd;
mod serve_cmd;

fn main() -> std::process::ExitCode {
    cli::main()
}
