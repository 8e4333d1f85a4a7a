//! Arbor as a library: the gRPC contract, the worker service and the coordinator.
//!
//! The `arbor` binary (`src/main.rs`) is the command line over this and the workspace crates:
//! `arbor-model` (the transformer engine), `arbor-search` (the search algorithms) and
//! `arbor-worker` (the engine serving the search's policy and scorer).

#![warn(missing_docs, unreachable_pub)]

pub mod rpc;
pub mod strategy;
