//! Accuracy of a model file through ONNX Runtime on a labelled folder (`FOLDER/<class>/...`,
//! the classes the model's metadata names): the figure that proves an exported file scores what
//! the trainer reported.

use crate::batch::predict_files;
use crate::session::{OnnxModel, SessionError};
use modelspec::preprocess::image_files;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Images per ONNX Runtime batch during an evaluation.
const BATCH: usize = 32;

/// Why a folder could not be evaluated.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error("{path}: {source}")]
    Folder { path: PathBuf, source: std::io::Error },
    #[error("{folder}: no images in the class folders {classes:?}")]
    Empty { folder: PathBuf, classes: Vec<String> },
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// Accuracy of an ONNX file through ONNX Runtime on a labelled folder.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub file: String,
    pub folder: String,
    pub images: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// The test accuracy the model's metadata reports (the trainer's), if any.
    pub reported_accuracy: Option<f64>,
    /// `path: reason` of each image that could not be read (skipped).
    pub unreadable: Vec<String>,
    /// In files with the out-of-distribution output: how many photos of the folder it rejects
    /// at the file's threshold, and the accuracy on the others.
    pub ood: Option<OodEvaluation>,
}

/// The out-of-distribution answer on a folder of photos of the model's classes.
#[derive(Debug, Clone, Serialize)]
pub struct OodEvaluation {
    pub threshold: f32,
    /// Photos answered `unknown` (score above the threshold).
    pub rejected: usize,
    pub rejected_share: f64,
    pub accepted: usize,
    pub accepted_correct: usize,
    /// Accuracy on the photos not rejected.
    pub accepted_accuracy: f64,
}

impl std::fmt::Display for Evaluation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on {}: {}/{} correct, accuracy {:.2}% through ONNX Runtime",
            self.file,
            self.folder,
            self.correct,
            self.images,
            100.0 * self.accuracy
        )?;
        if let Some(r) = self.reported_accuracy {
            write!(f, " (the trainer reported {:.2}%)", 100.0 * r)?;
        }
        if !self.unreadable.is_empty() {
            write!(f, "; {} unreadable images skipped", self.unreadable.len())?;
        }
        if let Some(o) = &self.ood {
            write!(
                f,
                "\n  out of distribution (score > {:.3}): {}/{} rejected ({:.2}%); accuracy on the {} accepted {:.2}%",
                o.threshold,
                o.rejected,
                self.images,
                100.0 * o.rejected_share,
                o.accepted,
                100.0 * o.accepted_accuracy
            )?;
        }
        Ok(())
    }
}

/// Runs every image of `folder/<class>/` (sub-folders included) through `model`.
pub fn evaluate(model: &mut OnnxModel, folder: &Path) -> Result<Evaluation, EvaluateError> {
    let desc = model.info.description.clone();
    let (mut files, mut labels) = (Vec::new(), Vec::new());
    for (label, class) in desc.classes.iter().enumerate() {
        let dir = folder.join(class);
        let found = image_files(&dir).map_err(|source| EvaluateError::Folder { path: dir, source })?;
        labels.extend(std::iter::repeat_n(label, found.len()));
        files.extend(found);
    }
    if files.is_empty() {
        return Err(EvaluateError::Empty { folder: folder.into(), classes: desc.classes });
    }
    let label_of: std::collections::HashMap<&PathBuf, usize> = files.iter().zip(labels.iter().copied()).collect();
    let r = predict_files(model, &files, BATCH)?;
    let correct = r.predicted.iter().filter(|(f, p)| p.top_class() == Some(label_of[f])).count();
    let images = r.predicted.len();
    let ood = model.info.ood.as_ref().filter(|_| model.has_ood_score).map(|m| {
        let check = |p: &crate::Prediction| crate::answer::OodCheck::of(p.ood_score, Some(m), true);
        let accepted: Vec<&(PathBuf, crate::Prediction)> =
            r.predicted.iter().filter(|(_, p)| !check(p).is_some_and(|c| c.rejects())).collect();
        let accepted_correct = accepted.iter().filter(|(f, p)| p.top_class() == Some(label_of[f])).count();
        OodEvaluation {
            threshold: m.threshold,
            rejected: images - accepted.len(),
            rejected_share: (images - accepted.len()) as f64 / images.max(1) as f64,
            accepted: accepted.len(),
            accepted_correct,
            accepted_accuracy: accepted_correct as f64 / accepted.len().max(1) as f64,
        }
    });
    Ok(Evaluation {
        file: model.path.display().to_string(),
        folder: folder.display().to_string(),
        images,
        correct,
        accuracy: correct as f64 / images.max(1) as f64,
        reported_accuracy: desc.metrics.as_ref().and_then(|m| m.get("test_accuracy")).and_then(|v| v.as_f64()),
        unreadable: r.failed.iter().map(|(f, e)| format!("{}: {e}", f.display())).collect(),
        ood,
    })
}

/// Accuracy and macro-F1 of predicted against true classes.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub correct: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
}

/// [`Scores`] of `pred` against `truth`, classes `0..k`.
pub fn scores(pred: &[usize], truth: &[usize], k: usize) -> Scores {
    let mut confusion = vec![vec![0usize; k]; k];
    for (&p, &t) in pred.iter().zip(truth) {
        confusion[t][p] += 1;
    }
    let correct: usize = (0..k).map(|c| confusion[c][c]).sum();
    let f1 = |c: usize| {
        let tp = confusion[c][c] as f64;
        let predicted: usize = (0..k).map(|t| confusion[t][c]).sum();
        let support: usize = confusion[c].iter().sum();
        let (p, r) = (tp / predicted.max(1) as f64, tp / support.max(1) as f64);
        if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        }
    };
    Scores {
        correct,
        accuracy: correct as f64 / pred.len().max(1) as f64,
        macro_f1: (0..k).map(f1).sum::<f64>() / k.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scores_by_hand() {
        // boot: 2 right, 1 called sandal; sandal: 1 right.
        let s = super::scores(&[0, 0, 1, 1], &[0, 0, 0, 1], 2);
        assert_eq!(s.correct, 3);
        assert_eq!(s.accuracy, 0.75);
        // F1 boot = 2·1·(2/3)/(1+2/3) = 0.8; sandal = 2·0.5·1/1.5 = 2/3.
        assert!((s.macro_f1 - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    }
}
