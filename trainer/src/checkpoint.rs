//! Checkpoints: one safetensors file holding the trainable variables, the best ones seen so
//! far, their moving average, the optimiser's moments, and (in its metadata) the training state
//! as JSON. It is written to a temporary file and renamed, so a run killed at any moment leaves
//! either the previous checkpoint or the new one, never half of one. The tensor names inside
//! (`var.`, `best.`, `ema.`, `opt.` + the variable's name) are this module's alone.

use crate::history::Epoch;
use anyhow::Context;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The two phases of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Phase {
    /// Phase 1: the head on the frozen base's pooled features.
    Head,
    /// Phase 2: the top blocks and the head, on the cached output of the last frozen block.
    FineTune,
}

impl Phase {
    /// 1 or 2, as the logs, history files and checkpoints number them.
    pub fn number(self) -> u8 {
        match self {
            Phase::Head => 1,
            Phase::FineTune => 2,
        }
    }
}

impl From<Phase> for u8 {
    fn from(p: Phase) -> u8 {
        p.number()
    }
}

impl TryFrom<u8> for Phase {
    type Error = String;
    fn try_from(n: u8) -> Result<Self, String> {
        match n {
            1 => Ok(Phase::Head),
            2 => Ok(Phase::FineTune),
            _ => Err(format!("phase {n} (expected 1 or 2)")),
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// Where training stands after a finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub phase: Phase,
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

impl TrainState {
    /// The state at the start of `phase`, after the epochs of `history`.
    pub fn start(phase: Phase, history: Vec<Epoch>) -> Self {
        Self {
            phase,
            next_epoch: 0,
            history,
            best_acc: -1.0,
            // Not infinity: JSON (the checkpoint's metadata) has no infinities.
            best_loss: f64::MAX,
            since_best: 0,
            lr_factor: 1.0,
            plateau_wait: 0,
            plateau_best: f64::MAX,
            opt_step: 0,
            phase_done: false,
        }
    }
}

/// What a checkpoint holds besides the state, each a set of tensors named by variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The trainable variables as they are.
    Vars,
    /// The variables of the best epoch so far (early stopping restores them).
    Best,
    /// The moving average of the variables (when on).
    Ema,
    /// The optimiser's moments, by the optimiser's own names.
    Optimizer,
}

impl Section {
    fn prefix(self) -> &'static str {
        match self {
            Section::Vars => "var.",
            Section::Best => "best.",
            Section::Ema => "ema.",
            Section::Optimizer => "opt.",
        }
    }
}

const META_KEY: &str = "train_state";

/// A checkpoint: the training state and its tensors.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub state: TrainState,
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    pub fn new(state: TrainState) -> Self {
        Self { state, tensors: HashMap::new() }
    }

    /// Adds named tensors to a section.
    pub fn put<'a>(&mut self, section: Section, tensors: impl IntoIterator<Item = (&'a str, Tensor)>) {
        for (name, t) in tensors {
            self.tensors.insert(format!("{}{name}", section.prefix()), t);
        }
    }

    /// The tensor `name` of a section, or an error naming what is missing.
    pub fn get(&self, section: Section, name: &str) -> anyhow::Result<Tensor> {
        self.tensors
            .get(&format!("{}{name}", section.prefix()))
            .cloned()
            .with_context(|| format!("the checkpoint lacks {section:?} tensor `{name}`"))
    }

    /// Writes the checkpoint atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        let meta = HashMap::from([(META_KEY.to_string(), serde_json::to_string(&self.state)?)]);
        let data: Vec<(&str, Tensor)> =
            self.tensors.iter().map(|(n, t)| Ok((n.as_str(), t.contiguous()?))).collect::<candle_core::Result<_>>()?;
        safetensors::serialize_to_file(data.iter().map(|(n, t)| (*n, t)), Some(meta), &tmp)
            .with_context(|| format!("writing checkpoint {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    /// Reads a checkpoint back.
    pub fn load(path: &Path, dev: &Device) -> anyhow::Result<Self> {
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
        Ok(Self { state, tensors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_state_and_sections_and_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("checkpoint-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.safetensors");
        let t = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let mut c = Checkpoint::new(TrainState::start(Phase::FineTune, vec![]));
        c.put(Section::Vars, [("w", t.clone())]);
        c.put(Section::Best, [("w", (&t * 2.0).unwrap())]);
        c.save(&path).unwrap();
        let back = Checkpoint::load(&path, &Device::Cpu).unwrap();
        assert_eq!(back.state, c.state);
        assert_eq!(back.get(Section::Best, "w").unwrap().to_vec1::<f32>().unwrap(), [2., 4., 6.]);
        let e = back.get(Section::Ema, "w").unwrap_err().to_string();
        assert!(e.contains("Ema") && e.contains("`w`"), "{e}");
        // The phase is stored as its number, as before the enum.
        assert!(serde_json::to_string(&c.state).unwrap().contains(r#""phase":2"#));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
