//! The out-of-distribution fit of a run (`models::ood`): the trained network's pooled features
//! of the training photos (originals, not the augmented variants), computed from the feature
//! caches, give the class means and the shared covariance; `ood.safetensors` and `ood.json` go
//! into the run directory, for the ONNX graph (the exporter does not build it in yet). The
//! threshold is not stored here: it is to be set on the validation photos through the written file.
//!
//! `trainer ood RUN` fits (again) for a finished run, `--dump DIR` also writes the features
//! and logits of the three splits and of any folder (for comparing scores, docs/ood.md).

use crate::features::FeatureCache;
use crate::train::Prepared;
use anyhow::Context;
use candle_core::{Device, ModuleT, Tensor};
use models::layers::{FEATURES, NUM_BLOCKS};
use models::ood::{Ood, OodFit};
use models::xception::global_avg_pool;
use models::Classifier;
use std::path::Path;

/// The trained network's pooled features [n · 2048] of the originals of a cache (variant 0),
/// from its block maps when the run fine-tuned blocks from `from`, else its pooled features
/// (the frozen base's, unchanged by training).
pub fn cache_features(
    net: &Classifier,
    cache: &FeatureCache,
    from: Option<usize>,
    dev: &Device,
) -> anyhow::Result<Vec<f32>> {
    let items: Vec<usize> = (0..cache.n).collect();
    let mut out = Vec::with_capacity(cache.n * FEATURES);
    for b in items.chunks(64) {
        let f = match from {
            Some(from) => {
                let m = cache.maps_batch(b, dev)?;
                global_avg_pool(&net.base.forward_blocks(&m, from, NUM_BLOCKS, &mut |_, _| {})?)?
            }
            None => cache.pooled_batch(b, dev)?,
        };
        out.extend(f.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Logits [n · classes] of features [n · 2048] through the run's head.
pub fn head_logits(net: &Classifier, features: &[f32], dev: &Device) -> anyhow::Result<Vec<f32>> {
    let head = net.head.as_ref().context("a model without a head")?;
    let n = features.len() / FEATURES;
    let x = Tensor::from_slice(features, (n, FEATURES), dev)?;
    Ok(head.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?)
}

pub use models::ood::quantile;

/// Fits the score of the run in `run_dir` on its caches and writes it there; returns the fit,
/// with the network and every split's features for a caller that wants more.
pub fn fit_run(run_dir: &Path, p: &Prepared, from: Option<usize>, dev: &Device) -> anyhow::Result<Fitted> {
    let t0 = std::time::Instant::now();
    let (net, desc) = Classifier::load(run_dir, dev)
        .with_context(|| format!("loading the trained model of {}", run_dir.display()))?;
    let mut features = Vec::new();
    for c in &p.caches {
        features.push(cache_features(&net, c, from, dev)?);
    }
    let labels = &p.caches[0].labels[..p.caches[0].n];
    let (ood, fit) = Ood::fit(&features[0], labels, FEATURES, desc.classes.len())
        .with_context(|| format!("fitting the out-of-distribution score of {}", run_dir.display()))?;
    ood.save(run_dir, &fit)?;
    let val = ood.scores(&features[1]);
    let cut = quantile(&val, 0.99);
    let test = ood.scores(&features[2]);
    let test_note = if test.is_empty() {
        String::new()
    } else {
        let r = test.iter().filter(|&&s| s > cut).count();
        format!("; test photos beyond it: {r}/{} ({:.2}%)", test.len(), 100.0 * r as f64 / test.len() as f64)
    };
    tracing::info!(
        "out-of-distribution score fitted on {} training photos (covariance shrinkage {:.3}) in {:.0} s: \
         validation median {:.3}, 99th percentile {cut:.3}{test_note} (the validation 99th percentile is logged, not stored)",
        labels.len(),
        fit.shrinkage,
        t0.elapsed().as_secs_f64(),
        quantile(&val, 0.5),
    );
    Ok(Fitted { net, ood, fit, features })
}

/// What [`fit_run`] computed.
pub struct Fitted {
    pub net: Classifier,
    pub ood: Ood,
    pub fit: OodFit,
    /// Pooled features of the train, validation and test originals, in cache order.
    pub features: Vec<Vec<f32>>,
}

/// Writes `name.features.f32` ([n, 2048]), `name.logits.f32` ([n, classes]), `name.labels.txt`
/// and `name.paths.txt` into `dir` (raw little-endian float32: `numpy.fromfile`).
pub fn dump(
    dir: &Path,
    name: &str,
    net: &Classifier,
    features: &[f32],
    labels: &[String],
    paths: &[std::path::PathBuf],
    dev: &Device,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let logits = head_logits(net, features, dev)?;
    let w = |ext: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let p = dir.join(format!("{name}.{ext}"));
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))
    };
    w("features.f32", bytemuck::cast_slice(features))?;
    w("logits.f32", bytemuck::cast_slice(&logits))?;
    w("labels.txt", (labels.join("\n") + "\n").as_bytes())?;
    let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    w("paths.txt", (paths.join("\n") + "\n").as_bytes())?;
    Ok(())
}

/// Pooled features of the photos under `folder` (every image, recursively) through the trained
/// network on Candle, and their paths (unreadable files skipped, named in the log).
pub fn folder_features(
    net: &Classifier,
    desc: &modelspec::ModelDescription,
    folder: &Path,
    dev: &Device,
) -> anyhow::Result<(Vec<f32>, Vec<std::path::PathBuf>)> {
    use modelspec::preprocess::{decode_batch, image_files, scale_pixels, DecodeLimits, Source};
    let files = image_files(folder).with_context(|| format!("listing {}", folder.display()))?;
    let (mut out, mut paths) = (Vec::new(), Vec::new());
    let s = desc.input_size;
    let pb = crate::progress::Progress::new(files.len(), &format!("features {}", folder.display()));
    for chunk in files.chunks(16) {
        let sources: Vec<Source> = chunk.iter().map(|f| Source::File(f)).collect();
        let d = decode_batch(&sources, s as u32, &desc.preprocessing, &DecodeLimits::default());
        for (i, e) in &d.failed {
            tracing::warn!("{}: {e}", chunk[*i].display());
        }
        if !d.decoded.is_empty() {
            let x = scale_pixels(&d.pixels, &desc.preprocessing);
            let x = Tensor::from_vec(x, (d.decoded.len(), s, s, 3), dev)?;
            out.extend(net.features(&x)?.flatten_all()?.to_vec1::<f32>()?);
            paths.extend(d.decoded.iter().map(|&i| chunk[i].clone()));
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish();
    Ok((out, paths))
}
