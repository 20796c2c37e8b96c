//! The trainer: fine-tunes the ImageNet Xception of `models` on an image folder and writes a
//! run directory (weights, model description, config, metrics, history) that the exporter reads.
//!
//! Flow: images → **trainer** → weights → exporter → .onnx → runtime.

pub mod augment;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod eval;
pub mod features;
pub mod history;
pub mod leaks;
pub mod metrics;
pub mod ood;
pub mod optim;
pub mod plots;
pub mod progress;
pub mod report;
pub mod soup;
pub mod sweep;
pub mod train;
