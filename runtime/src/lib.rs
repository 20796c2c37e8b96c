//! The `footwear` binary's library: the HTTP server ([`server`]) with its micro-batching queue
//! ([`batcher`]) and Prometheus metrics ([`metrics`]). Loading and running the model is the
//! `inference` crate's, shared with the exporter; no Candle here.

pub mod batcher;
pub mod metrics;
pub mod server;
