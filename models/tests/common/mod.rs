//! Paths shared by the tests that need the real weights and the TensorFlow fixtures.

#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `../shared/fixtures`, computed with TensorFlow 2.21 / Keras 3.15 (see its README).
pub fn fixtures() -> PathBuf {
    repo().join("../shared/fixtures")
}

/// The converted weights (`scripts/fetch-weights.sh`), or a panic saying how to get them.
pub fn weights(name: &str) -> PathBuf {
    let dir = std::env::var_os("WEIGHTS_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("weights"));
    let p = dir.join(name);
    assert!(p.join("model.safetensors").exists(), "{} is missing: run scripts/fetch-weights.sh first", p.display());
    p
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
