//! Calibration of an int8 file: the value range of every activation, measured by running photos
//! through the Candle model's own forward pass (its taps: each convolution, depthwise output,
//! pool and residual sum, then the pooled features and the head's hidden layer).
//!
//! Photos: from the run's training split, a few hundred by default, the same number per class,
//! picked by a seeded shuffle. Methods: `minmax` (the extremes seen) or `percentile` (per batch,
//! the `p`-th and `(100 − p)`-th percentiles of each activation, averaged over the batches: a
//! few outliers no longer stretch the scale that every other value is rounded to).

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use models::classifier::Classifier;
use models::head::DENSE;
use models::xception::global_avg_pool;
use modelspec::preprocess::{decode_batch, image_files, DecodeLimits, Source};
use modelspec::ModelDescription;
use onnxgraph::quant::{DENSE_TAP, POOLED_TAP};
use onnxgraph::TapRanges;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How a range is taken from the values seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[value(name = "minmax")]
    MinMax,
    Percentile,
}

/// What to calibrate on and how.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CalibrationOptions {
    /// Photos (files or folders of class folders); empty: the run's training split.
    pub photos: Vec<PathBuf>,
    /// How many photos, the same number per class.
    pub count: usize,
    pub seed: u64,
    pub method: Method,
    /// For `percentile`: e.g. 99.99.
    pub percentile: f64,
    pub batch: usize,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        // MinMax: chosen on the validation split (docs/benchmarks.md), one photo ahead of the
        // 99.99 percentile.
        Self { photos: vec![], count: 300, seed: 0, method: Method::MinMax, percentile: 99.99, batch: 16 }
    }
}

/// What a calibration saw (written into the file's metadata and the verification report).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Calibration {
    pub method: Method,
    /// `None` for minmax.
    pub percentile: Option<f64>,
    pub photos: usize,
    pub seed: u64,
    /// Where the photos came from.
    pub source: String,
    /// Activations calibrated.
    pub activations: usize,
    /// Range of the int8 weights (7: −63..63, runs correctly on every x86 CPU; 8: VNNI only).
    pub weight_bits: u8,
}

/// `count` photos of `split/<class>/`, `count / classes` per class (the first classes one more
/// when it does not divide), each class's files shuffled with `seed`.
pub fn stratified(split: &Path, classes: &[String], count: usize, seed: u64) -> anyhow::Result<Vec<PathBuf>> {
    let files = crate::photos::labelled(split, classes).context("calibration photos")?;
    stratified_files(&files, classes.len(), count, seed)
        .with_context(|| format!("calibration: no photos under {}/<class>/", split.display()))
}

/// [`stratified`] from a list of labelled photos (in file-name order within each class).
pub fn stratified_files(
    files: &[(PathBuf, usize)],
    classes: usize,
    count: usize,
    seed: u64,
) -> anyhow::Result<Vec<PathBuf>> {
    let k = classes.max(1);
    let mut out = Vec::new();
    for i in 0..classes {
        let mut mine: Vec<PathBuf> = files.iter().filter(|(_, l)| *l == i).map(|(f, _)| f.clone()).collect();
        mine.sort();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
        mine.shuffle(&mut rng);
        let want = count / k + usize::from(i < count % k);
        out.extend(mine.into_iter().take(want));
    }
    if out.is_empty() {
        bail!("no photos");
    }
    Ok(out)
}

/// The photos a calibration uses (see [`CalibrationOptions::photos`]).
pub fn photos(
    o: &CalibrationOptions,
    run_dir: &Path,
    desc: &ModelDescription,
) -> anyhow::Result<(Vec<PathBuf>, String)> {
    if o.photos.is_empty() {
        let Some((train, what)) = crate::photos::split_photos(run_dir, desc, modelspec::splits::Split::Train)? else {
            bail!(
                "calibration needs photos: the run names no training photos (data folder {:?}); pass --calibration-photos",
                desc.dataset
            );
        };
        let files = stratified_files(&train, desc.classes.len(), o.count, o.seed)
            .with_context(|| format!("calibration: no photos in {what}"))?;
        return Ok((files, what));
    }
    let mut files = Vec::new();
    for p in &o.photos {
        if p.is_dir() {
            if desc.classes.iter().all(|c| p.join(c).is_dir()) {
                files.extend(stratified(p, &desc.classes, o.count, o.seed)?);
            } else {
                files.extend(image_files(p).with_context(|| format!("listing {}", p.display()))?);
            }
        } else {
            files.push(p.clone());
        }
    }
    files.truncate(o.count.max(1));
    let source = o.photos.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    Ok((files, source))
}

/// Per-tap statistics.
#[derive(Default)]
struct Stat {
    min: f32,
    max: f32,
    lo_sum: f64,
    hi_sum: f64,
    batches: usize,
}

fn percentiles(t: &Tensor, p: f64) -> anyhow::Result<(f32, f32, f32, f32)> {
    let mut v = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    let (min, max) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    let n = v.len();
    let hi_i = (((p / 100.0) * (n - 1) as f64).round() as usize).min(n - 1);
    let lo_i = (((1.0 - p / 100.0) * (n - 1) as f64).round() as usize).min(n - 1);
    let hi = *v.select_nth_unstable_by(hi_i, f32::total_cmp).1;
    let lo = *v.select_nth_unstable_by(lo_i, f32::total_cmp).1;
    Ok((min, max, lo, hi))
}

/// What one pass over the calibration photos saw: enough for the ranges of either method.
pub struct Calibrated {
    stats: HashMap<String, Stat>,
    /// Photos that could be read.
    pub used: usize,
}

impl Calibrated {
    /// How many activations were calibrated.
    pub fn activations(&self) -> usize {
        self.stats.len()
    }

    /// The activation ranges of `method` (the percentile is the one of the pass).
    pub fn ranges(&self, method: Method) -> TapRanges {
        self.stats
            .iter()
            .map(|(k, s)| {
                let r = match method {
                    Method::MinMax => (s.min, s.max),
                    Method::Percentile => ((s.lo_sum / s.batches as f64) as f32, (s.hi_sum / s.batches as f64) as f32),
                };
                (k.clone(), r)
            })
            .collect()
    }
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::MinMax => "minmax",
            Method::Percentile => "percentile",
        }
    }

    /// The other method: the exporter's second try when a file fails its verification.
    pub fn other(self) -> Method {
        match self {
            Method::MinMax => Method::Percentile,
            Method::Percentile => Method::MinMax,
        }
    }
}

/// Runs `files` through the model of `dir` once, recording every activation's extremes and
/// percentiles (the ranges of both methods come from this one pass).
pub fn calibrate(dir: &Path, files: &[PathBuf], o: &CalibrationOptions) -> anyhow::Result<Calibrated> {
    let dev = Device::Cpu;
    let (model, desc) = Classifier::load(dir, &dev).with_context(|| format!("loading {}", dir.display()))?;
    let weights = candle_core::safetensors::load(dir.join(modelspec::WEIGHTS_FILE), &dev)?;
    let dense_w = weights.get(&format!("{DENSE}.weight")).context("the model has no head")?;
    let dense_b = weights.get(&format!("{DENSE}.bias")).context("the model has no head")?;
    let size = desc.input_size;
    let mut stats: HashMap<String, Stat> = HashMap::new();
    let mut add = |name: &str, t: &Tensor| -> anyhow::Result<()> {
        let (min, max, lo, hi) = percentiles(t, o.percentile)?;
        let s = stats.entry(name.to_string()).or_insert(Stat { min, max, ..Default::default() });
        s.min = s.min.min(min);
        s.max = s.max.max(max);
        s.lo_sum += lo as f64;
        s.hi_sum += hi as f64;
        s.batches += 1;
        Ok(())
    };
    let mut used = 0;
    for chunk in files.chunks(o.batch.max(1)) {
        let sources: Vec<Source> = chunk.iter().map(|f| Source::File(f)).collect();
        let d = decode_batch(&sources, size as u32, &desc.preprocessing, &DecodeLimits::default());
        for (i, e) in &d.failed {
            tracing::warn!("calibration: {} skipped: {e}", chunk[*i].display());
        }
        let n = d.decoded.len();
        if n == 0 {
            continue;
        }
        used += n;
        let x = modelspec::preprocess::scale_pixels(&d.pixels, &desc.preprocessing);
        let x = Tensor::from_vec(x, (n, size, size, 3), &dev)?;
        let mut taps: Vec<(String, Tensor)> = Vec::new();
        let top = model.base.forward_with_taps(&x, &mut |name, t| taps.push((name.to_string(), t.clone())))?;
        for (name, t) in &taps {
            add(name, t)?;
        }
        let pooled = global_avg_pool(&top)?;
        add(POOLED_TAP, &pooled)?;
        let dense = pooled.matmul(&dense_w.t()?)?.broadcast_add(dense_b)?.relu()?;
        add(DENSE_TAP, &dense)?;
    }
    if used == 0 {
        bail!("calibration: none of the {} photos could be read", files.len());
    }
    Ok(Calibrated { stats, used })
}
