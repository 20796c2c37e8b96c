//! The runtime: one self-describing `model.onnx` served with ONNX Runtime. No Candle here: the
//! preprocessing is `modelspec`'s (the trainer's own), the model is whatever the exporter wrote.

pub mod answer;
pub mod batcher;
pub mod metrics;
pub mod model;
pub mod ortlib;
pub mod server;

pub use model::{ModelError, OnnxModel, Prediction, SessionConfig};
