//! The out-of-distribution output of an exported file (`ood_score`, docs/ood.md).
//!
//! - The fit comes from the run directory (`ood.safetensors`, written by the trainer at the end
//!   of every run from its training photos' features, or by `trainer ood RUN`): its whitening and
//!   class centres join the graph's weights ([`add_fit`]) and `onnxgraph` builds the score in.
//! - The threshold is set on in-distribution photos only, the run's validation split, through the
//!   written file itself ([`set_threshold`]): the `1 − rate` quantile of its own scores (each
//!   precision gets its own, since int8 and float16 features differ a little), so that the share
//!   of validation photos rejected is the rate asked for. It goes into the `ood` metadata with
//!   how it was set; the photos it is judged on (insects, noise) are never used.

use crate::graph::Weights;
use crate::photos;
use anyhow::{bail, Context};
use candle_onnx::onnx::{ModelProto, StringStringEntryProto};
use models::layers::FEATURES;
use models::ood::{self, Ood, OodFit};
use modelspec::onnx_meta::{self, OodMeta};
use modelspec::splits::Split;
use modelspec::ModelDescription;
use std::path::{Path, PathBuf};

/// The share of validation photos the threshold rejects unless told otherwise.
pub const DEFAULT_REJECTION: f64 = 0.01;

/// Images per ONNX Runtime batch while the validation photos are scored.
const BATCH: usize = 32;

/// Adds the fit of `run_dir` to `weights` when the run has one (said in the log when it has
/// not: such a file has no `ood_score` output); returns it.
pub fn add_fit(
    run_dir: &Path,
    desc: &ModelDescription,
    weights: &mut Weights,
) -> anyhow::Result<Option<(Ood, OodFit)>> {
    if desc.head.is_none() {
        return Ok(None);
    }
    let Some((fit, info)) = Ood::load(run_dir, FEATURES, desc.classes.len())
        .with_context(|| format!("reading the out-of-distribution fit of {}", run_dir.display()))?
    else {
        tracing::info!(
            "{} has no {}: the file gets no `{}` output (`trainer ood {}` fits it)",
            run_dir.display(),
            ood::OOD_FILE,
            onnx_meta::OOD_SCORE_NAME,
            run_dir.display()
        );
        return Ok(None);
    };
    if info.method != ood::METHOD {
        bail!(
            "{}: method `{}`, this exporter builds `{}` (docs/ood.md): `trainer ood {}` refits it, or export with --no-ood",
            run_dir.join(ood::OOD_INFO).display(),
            info.method,
            ood::METHOD,
            run_dir.display()
        );
    }
    let (d, k) = (fit.dim, fit.classes);
    weights.insert(ood::PROJECTION.into(), (vec![d, d], fit.projection.clone()));
    weights.insert(ood::CENTRES.into(), (vec![k, d], fit.centres.clone()));
    Ok(Some((fit, info)))
}

/// The rate must leave photos on both sides.
pub fn check_rate(rate: f64) -> anyhow::Result<()> {
    if !(rate > 0.0 && rate < 0.5) {
        bail!("--ood-rejection {rate}: the share of validation photos to reject must be above 0 and below 0.5");
    }
    Ok(())
}

/// Scores the validation photos of the run through the file `bytes` (`name` names it) with ONNX
/// Runtime and sets the threshold at the `1 − rate` quantile of their scores.
pub fn set_threshold(
    bytes: &[u8],
    name: &Path,
    run_dir: &Path,
    desc: &ModelDescription,
    rate: f64,
    fit: &OodFit,
    ort: &inference::SessionConfig,
) -> anyhow::Result<OodMeta> {
    check_rate(rate)?;
    let Some((files, from)) = photos::split_photos(run_dir, desc, Split::Validation)? else {
        bail!(
            "the out-of-distribution threshold is set on the run's validation photos, and {} names none; \
             export with --no-ood",
            run_dir.display()
        )
    };
    let paths: Vec<PathBuf> = files.into_iter().map(|(f, _)| f).collect();
    let t = std::time::Instant::now();
    let mut model = inference::OnnxModel::from_bytes(bytes, name, ort)?;
    anyhow::ensure!(model.has_ood_score, "{}: no `{}` output", name.display(), onnx_meta::OOD_SCORE_NAME);
    let r = inference::batch::predict_files(&mut model, &paths, BATCH)?;
    for (f, e) in &r.failed {
        tracing::warn!("{}: {e} (not scored)", f.display());
    }
    let scores: Vec<f32> = r.predicted.iter().filter_map(|(_, p)| p.ood_score).collect();
    if scores.len() < 2 {
        bail!("{from}: {} photos scored; the threshold needs some (export with --no-ood)", scores.len());
    }
    if (scores.len() as f64) * rate < 1.0 {
        tracing::warn!(
            "{from}: {} photos are too few to reject {:.2}% of them: the threshold lies between their largest scores",
            scores.len(),
            100.0 * rate
        );
    }
    if let Some(bad) = scores.iter().find(|s| !s.is_finite()) {
        bail!("{}: a validation photo scores {bad}", name.display());
    }
    let threshold = ood::quantile(&scores, 1.0 - rate);
    let rejected = scores.iter().filter(|&&s| s > threshold).count();
    tracing::info!(
        "out-of-distribution threshold {threshold:.4}: {rejected}/{} validation photos above it ({:.2}%, asked {:.2}%), \
         median score {:.3}, scored in {:.0} s",
        scores.len(),
        100.0 * rejected as f64 / scores.len() as f64,
        100.0 * rate,
        ood::quantile(&scores, 0.5),
        t.elapsed().as_secs_f64()
    );
    Ok(OodMeta {
        method: ood::METHOD.into(),
        threshold,
        rejection_rate: rate,
        set_on: format!(
            "the {}-quantile of this file's {} on {from} (ONNX Runtime)",
            1.0 - rate,
            onnx_meta::OOD_SCORE_NAME
        ),
        photos: scores.len(),
        rejected: rejected as f64 / scores.len() as f64,
        fitted_on: fit.photos.clone(),
    })
}

/// Writes `meta` into the model's metadata (replacing an earlier one).
pub fn put_meta(model: &mut ModelProto, meta: &OodMeta) -> anyhow::Result<()> {
    model.metadata_props.retain(|p| p.key != onnx_meta::OOD);
    model
        .metadata_props
        .push(StringStringEntryProto { key: onnx_meta::OOD.into(), value: serde_json::to_string(meta)? });
    Ok(())
}
