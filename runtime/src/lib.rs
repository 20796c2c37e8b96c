//! The `footwear` binary's library: the HTTP server ([`server`], with the KServe v2 endpoints
//! and Triton's extensions in [`v2`]) and the gRPC one ([`grpc`]) in front of the model being
//! served ([`model`]: its micro-batching queue, [`batcher`], hot reload and statistics), and
//! Prometheus metrics ([`metrics`]). Loading and running the model is the `inference` crate's,
//! shared with the exporter; no Candle here.

pub mod batcher;
pub mod conn;
pub mod grpc;
pub mod metrics;
pub mod model;
pub mod server;
pub mod v2;
