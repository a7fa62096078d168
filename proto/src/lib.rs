//! MoltBot's gRPC contracts: one module per service package
//! (`moltbot.<service>.v1`), generated from `proto/moltbot/<service>/v1/`.
//!
//! Every server trait method has a default body that answers `UNIMPLEMENTED`
//! (tonic-prost-build's `generate_default_stubs`), so a service only overrides
//! the RPCs it really serves.

#![allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]

/// Encoded `FileDescriptorSet` of every MoltBot proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/moltbot_descriptor.bin"));

/// `moltbot.understanding.v1`: intent classification and embeddings.
pub mod understanding {
    /// Version 1 of the contract.
    pub mod v1 {
        tonic::include_proto!("moltbot.understanding.v1");
    }
}

/// `moltbot.generation.v1`: token generation.
pub mod generation {
    /// Version 1 of the contract.
    pub mod v1 {
        tonic::include_proto!("moltbot.generation.v1");
    }
}

/// `moltbot.retrieval.v1`: knowledge-base ingestion and search.
pub mod retrieval {
    /// Version 1 of the contract.
    pub mod v1 {
        tonic::include_proto!("moltbot.retrieval.v1");
    }
}

/// `moltbot.context.v1`: conversation memory.
pub mod context {
    /// Version 1 of the contract.
    pub mod v1 {
        tonic::include_proto!("moltbot.context.v1");
    }
}

/// `moltbot.auth.v1`: provider credentials, health and circuit breakers.
pub mod auth {
    /// Version 1 of the contract.
    pub mod v1 {
        tonic::include_proto!("moltbot.auth.v1");
    }
}
