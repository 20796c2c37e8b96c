//! Predictions for a list of image files, in batches: the files are decoded and resized with
//! `modelspec`'s one batch loop, run through the model, and the ones that could not be read are
//! listed with the reason, the others still predicted. What `footwear predict` and the
//! exporter's evaluation run.

use crate::session::{OnnxModel, Prediction, SessionError};
use modelspec::preprocess::{decode_batch, DecodeLimits, ImageError, Source};
use std::path::PathBuf;

/// The outcome for a list of files.
#[derive(Debug, Default)]
pub struct FilePredictions {
    /// The files predicted, in the order given, with their predictions.
    pub predicted: Vec<(PathBuf, Prediction)>,
    /// The files that could not be read or decoded, with the reason.
    pub failed: Vec<(PathBuf, ImageError)>,
}

/// Predicts `files` in batches of `batch` images (decoding of a batch runs in parallel).
/// Unreadable files are listed in `failed`; an ONNX Runtime failure ends the whole call.
pub fn predict_files(model: &mut OnnxModel, files: &[PathBuf], batch: usize) -> Result<FilePredictions, SessionError> {
    let (size, prep) = (model.input_size() as u32, model.info.description.preprocessing.clone());
    let mut out = FilePredictions::default();
    for chunk in files.chunks(batch.max(1)) {
        let sources: Vec<Source> = chunk.iter().map(|f| Source::File(f)).collect();
        let decoded = decode_batch(&sources, size, &prep, &DecodeLimits::default());
        out.failed.extend(decoded.failed.into_iter().map(|(i, e)| (chunk[i].clone(), e)));
        if decoded.decoded.is_empty() {
            continue;
        }
        let n = decoded.decoded.len();
        let predictions = model.run(decoded.pixels, n)?;
        out.predicted.extend(decoded.decoded.iter().map(|&i| chunk[i].clone()).zip(predictions));
    }
    Ok(out)
}
