//! Per-epoch figures of a run, saved as CSV and JSON and drawn by `plots`.

use crate::checkpoint::Phase;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Epoch {
    pub phase: Phase,
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub val_loss: f64,
    pub val_acc: f64,
    /// Validation macro-F1 (0 in checkpoints written before it was kept).
    #[serde(default)]
    pub val_macro_f1: f64,
    pub seconds: f64,
}

/// Writes the history as CSV.
pub fn write_csv(history: &[Epoch], path: &Path) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    for e in history {
        w.serialize(e)?;
    }
    w.flush()?;
    Ok(())
}
