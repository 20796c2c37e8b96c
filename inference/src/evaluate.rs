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
    Ok(Evaluation {
        file: model.path.display().to_string(),
        folder: folder.display().to_string(),
        images,
        correct,
        accuracy: correct as f64 / images.max(1) as f64,
        reported_accuracy: desc.metrics.as_ref().and_then(|m| m.get("test_accuracy")).and_then(|v| v.as_f64()),
        unreadable: r.failed.iter().map(|(f, e)| format!("{}: {e}", f.display())).collect(),
    })
}
