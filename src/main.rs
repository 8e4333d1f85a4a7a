//! `arbor`: test-time search over reasoning steps, on a native transformer engine.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
