//! Checkpoints: one safetensors file holding the trainable variables, the best ones seen so
//! far, the optimiser's moments, and (in its metadata) the training state as JSON. It is written
//! to a temporary file and renamed, so a run killed at any moment leaves either the previous
//! checkpoint or the new one, never half of one.

use crate::history::Epoch;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Where training stands after a finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// 1: head; 2: fine-tuning.
    pub phase: usize,
    /// The next epoch to run in `phase`.
    pub next_epoch: usize,
    /// Every finished epoch of both phases.
    pub history: Vec<Epoch>,
    /// Early stopping: best validation accuracy and loss of this phase, epochs since.
    pub best_acc: f64,
    pub best_loss: f64,
    pub since_best: usize,
    /// Reduce-on-plateau: current factor of the base rate, epochs without a lower loss, lowest loss.
    pub lr_factor: f64,
    pub plateau_wait: usize,
    pub plateau_best: f64,
    /// Optimiser steps taken in this phase.
    pub opt_step: u64,
    /// The phase stopped early: go on with the next phase.
    pub phase_done: bool,
}

const META_KEY: &str = "train_state";

/// Writes the checkpoint atomically.
pub fn save(path: &Path, state: &TrainState, tensors: &[(String, Tensor)]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut meta = HashMap::new();
    meta.insert(META_KEY.to_string(), serde_json::to_string(state)?);
    let data: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| Ok((n.clone(), t.contiguous()?))).collect::<candle_core::Result<_>>()?;
    safetensors::serialize_to_file(data.iter().map(|(n, t)| (n.as_str(), t)), Some(meta), &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads a checkpoint back: its state and its tensors by name.
pub fn load(path: &Path, dev: &Device) -> anyhow::Result<(TrainState, HashMap<String, Tensor>)> {
    use anyhow::Context;
    let bytes = std::fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: not a checkpoint", path.display()))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .with_context(|| format!("{}: no training state inside", path.display()))?;
    let state: TrainState =
        serde_json::from_str(json).with_context(|| format!("{}: bad training state", path.display()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, dev)
        .with_context(|| format!("{}: bad tensors", path.display()))?;
    Ok((state, tensors))
}
