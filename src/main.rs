//! `arbor`: test-time search over reasoning steps, on a native transformer engine.

mod cli;
mod prm_cmd;
mod search_cmd;

fn main() -> std::process::ExitCode {
    cli::main()
}
