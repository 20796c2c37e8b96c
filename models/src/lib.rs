//! The networks of the toolchain, in Candle: Xception exactly as Keras defines it, its classifier
//! head, the fast CPU kernels they run on, and the import of Keras weights.
//!
//! Flow: images → trainer → weights → exporter → .onnx → runtime. This crate owns the network
//! and its weights; the trainer and the exporter build on it, the runtime never links it.

pub mod alloc;
pub mod classifier;
pub mod error;
pub mod head;
pub mod keras_import;
pub mod layers;
pub mod ood;
pub mod ops;
pub mod weights;
pub mod xception;

pub use classifier::Classifier;
pub use error::ModelError;
pub use modelspec::ModelDescription;
pub use xception::{Xception, XceptionOptions};
