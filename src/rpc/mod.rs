//! Arbor over gRPC: the generated types, the worker service and the coordinator.

/// Code generated from `proto/arbor/v1/arbor.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("arbor.v1");

    /// The encoded descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/arbor_descriptor.bin"));
}

pub mod auth;
pub mod coordinator;
pub mod limits;
pub mod metrics;
pub mod pool;
pub mod tls;
pub mod worker;

/// The health service name for liveness probes: SERVING while the process can work, through a
/// drain included (readiness, `""` and the named service, turns NOT_SERVING when draining);
/// NOT_SERVING on a worker whose engine thread has ended, which only a restart mends.
pub const LIVENESS: &str = "liveness";

/// The gRPC reflection service for Arbor's services (`--reflection`).
pub(crate) fn reflection_service() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid")
}
