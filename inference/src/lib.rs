//! Inference on one self-describing `model.onnx` with ONNX Runtime, shared by the `footwear`
//! binary (runtime/) and the exporter's verification and evaluation: finding and loading ONNX
//! Runtime's library ([`ortlib`]), sessions on the CPU or CUDA execution provider ([`session`]),
//! batches of image files ([`batch`]), answers ([`answer`]) and accuracy over a labelled folder
//! ([`evaluate`]). No Candle and no HTTP here: the preprocessing is `modelspec`'s (the trainer's
//! own), the model is whatever the exporter wrote.

pub mod answer;
pub mod batch;
pub mod evaluate;
pub mod ortlib;
pub mod session;

pub use session::{ExecutionProvider, OnnxModel, Prediction, SessionConfig, SessionError};
