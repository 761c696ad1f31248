//! Protocol definitions for Lookaside, generated from `proto/` at build time.
//!
//! Only generated code lives here; mapping to domain types happens in the
//! crates that consume it.

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// `lookaside.v1`: Discovery and Admin.
pub mod lookaside {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("lookaside.v1");
    }
}

/// `grpc.lb.v1`: the grpclb protocol.
pub mod grpclb {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("grpc.lb.v1");
    }
}

/// `helloworld`: the greeter example.
pub mod helloworld {
    tonic::include_proto!("helloworld");
}

/// Encoded `FileDescriptorSet` of `lookaside.v1` and `grpc.lb.v1`, for lb-server's reflection.
pub const LOOKASIDE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("lookaside_descriptor");

/// Encoded `FileDescriptorSet` of `helloworld`, for greeter-server's reflection.
pub const HELLOWORLD_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("helloworld_descriptor");
