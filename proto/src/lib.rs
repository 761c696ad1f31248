//! Protocol definitions for Lookaside, generated from `proto/` at build time.
//!
//! Only generated code lives here, and the limits both ends of a protocol
//! must agree on ([`lookaside::v1::MAX_WATCH_RESPONSE_BYTES`]); mapping to
//! domain types happens in the crates that consume it.

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// `lookaside.v1`: Discovery and Admin.
pub mod lookaside {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("lookaside.v1");

        /// The largest `WatchResponse` (encoded message, without its 5-byte
        /// gRPC prefix) lb-server sends and lb-client accepts: 16 MiB, both
        /// ends read this one constant so that they cannot disagree.
        ///
        /// Sized for the largest Service Kubernetes runs: an endpoint with
        /// the longest names Kubernetes allows (an IPv6 address of 45
        /// characters, pod and node names of 253, a zone of 63) encodes in
        /// under 640 bytes, so 16 MiB holds over 26,000 of them: five times
        /// the 5,000 backends per Service of Kubernetes' scalability
        /// thresholds, and still 2.6 times that number in a dual-stack
        /// Service (an endpoint per address family). Topology hints add to
        /// that: with a zone hint and a node hint of those longest names (the
        /// controllers set one of each), an endpoint stays under 1,000 bytes
        /// and 16 MiB holds over 16,000 of them, three times the threshold.
        /// Real names are far shorter. A snapshot over the limit anyway (a
        /// file source can list any number of endpoints, with names of any
        /// length) is sent without `pod` and `node`, which lb-client does not
        /// route by, then if need be without `zone` and the hints too; if
        /// even that is over, the stream ends with `RESOURCE_EXHAUSTED`
        /// rather than send a message the client would refuse.
        pub const MAX_WATCH_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
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

/// `xds.*`: the ORCA backend load reports of the CNCF xDS API (modules
/// nest as the packages do, as the generated code refers across them).
pub mod xds {
    /// `xds.data`.
    pub mod data {
        /// `xds.data.orca`.
        pub mod orca {
            /// `xds.data.orca.v3`: the load report.
            pub mod v3 {
                tonic::include_proto!("xds.data.orca.v3");
            }
        }
    }
    /// `xds.service`.
    pub mod service {
        /// `xds.service.orca`.
        pub mod orca {
            /// `xds.service.orca.v3`: out-of-band reporting.
            pub mod v3 {
                tonic::include_proto!("xds.service.orca.v3");
            }
        }
    }
}

/// Encoded `FileDescriptorSet` of `lookaside.v1` and `grpc.lb.v1`, for lb-server's reflection.
pub const LOOKASIDE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("lookaside_descriptor");

/// Encoded `FileDescriptorSet` of `helloworld`, for greeter-server's reflection.
pub const HELLOWORLD_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("helloworld_descriptor");

/// Encoded `FileDescriptorSet` of the ORCA packages, for a reporting server's reflection.
pub const ORCA_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("orca_descriptor");
