//! The exporter: a model directory (a training run, or a model imported from Keras) → one
//! self-describing `model.onnx`, verified against the Candle model before it replaces anything.

pub mod graph;
pub mod triton;
pub mod verify;

use anyhow::{bail, Context};
use candle_core::Device;
use graph::{Precision, Weights};
use models::weights::ModelDir;
use modelspec::onnx_meta;
use prost::Message;
use std::path::{Path, PathBuf};

/// The toolchain's name and version, written into every file.
pub const PRODUCER: &str = "footwear-exporter";

/// What to export and how.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub run_dir: PathBuf,
    pub out: PathBuf,
    pub precision: Precision,
    pub input_type: onnx_meta::InputType,
    pub model_version: i64,
    /// Verify before the file replaces the previous one.
    pub verify: bool,
    /// Sample images for the verification (files or folders); empty: the run's test split, else
    /// synthetic images.
    pub samples: Vec<PathBuf>,
    pub max_samples: usize,
    /// Also run the file through candle-onnx.
    pub candle_onnx: bool,
    /// Largest absolute difference of logits accepted (1e-4 for float32).
    pub tolerance: f32,
    pub ort: runtime::SessionConfig,
}

/// What an export produced.
pub struct Exported {
    pub path: PathBuf,
    pub bytes: usize,
    pub report: Option<verify::Report>,
    pub report_path: Option<PathBuf>,
}

/// The weights of a model directory as plain arrays.
pub fn load_weights(dir: &ModelDir) -> anyhow::Result<Weights> {
    dir.tensors.iter().map(|(k, t)| Ok((k.clone(), (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?)))).collect()
}

/// Where the verification report of `out` goes: `model.onnx` → `model.verification.json`.
pub fn report_path(out: &Path) -> PathBuf {
    out.with_extension("verification.json")
}

/// The data folder a training run used (its `config.toml`), if the run has one.
fn run_data_dir(run_dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(run_dir.join("config.toml")).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    Some(PathBuf::from(v.get("data")?.as_str()?))
}

/// Exports `o.run_dir` to `o.out`: graph, metadata, atomic write, verification.
pub fn export(o: &ExportOptions) -> anyhow::Result<Exported> {
    let dir = ModelDir::load(&o.run_dir, &Device::Cpu)
        .with_context(|| format!("reading the model directory {}", o.run_dir.display()))?;
    let desc = &dir.description;
    let weights = load_weights(&dir)?;
    let toolchain = format!("{PRODUCER} {} (opset {})", env!("CARGO_PKG_VERSION"), graph::OPSET);
    let props = onnx_meta::properties(desc, o.input_type, o.model_version, &toolchain);
    let model = graph::build(
        desc,
        &weights,
        o.precision,
        o.input_type,
        &props,
        o.model_version,
        (PRODUCER, env!("CARGO_PKG_VERSION")),
    )?;
    let bytes = model.encode_to_vec();

    // Written beside the target and renamed over it only once verified.
    let parent = o.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = o.out.file_name().context("the output needs a file name")?.to_string_lossy().into_owned();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    let cleanup = |e: anyhow::Error| {
        let _ = std::fs::remove_file(&tmp);
        e
    };

    let mut report = None;
    if o.verify {
        let samples = if !o.samples.is_empty() {
            verify::Samples::from_paths(&o.samples, desc, o.max_samples).map_err(cleanup)?
        } else if let Some(test) = run_data_dir(&o.run_dir).map(|d| d.join("test")).filter(|d| d.is_dir()) {
            let per_class = (o.max_samples / desc.classes.len().max(1)).max(1);
            verify::Samples::from_split(&test, desc, per_class).map_err(cleanup)?
        } else {
            verify::Samples::synthetic(desc, o.max_samples.min(4))
        };
        let r = verify::verify(&tmp, &samples, &dir, o).map_err(cleanup)?;
        if !r.passed {
            let _ = std::fs::remove_file(&tmp);
            bail!("{r}\nthe ONNX file does not match the model; {} was left unchanged", o.out.display());
        }
        report = Some(r);
    }
    std::fs::rename(&tmp, &o.out).with_context(|| format!("renaming {} to {}", tmp.display(), o.out.display()))?;
    let report_path = match &report {
        Some(r) => {
            let p = report_path(&o.out);
            std::fs::write(&p, serde_json::to_string_pretty(r)?).with_context(|| format!("writing {}", p.display()))?;
            Some(p)
        }
        None => None,
    };
    Ok(Exported { path: o.out.clone(), bytes: bytes.len(), report, report_path })
}

/// Accuracy of an ONNX file through ONNX Runtime on a labelled folder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Evaluation {
    pub file: String,
    pub folder: String,
    pub images: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// The test accuracy the model's metadata reports (the trainer's), if any.
    pub reported_accuracy: Option<f64>,
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

/// Runs every image of `folder/<class>/` through `onnx` with ONNX Runtime.
pub fn evaluate(onnx: &Path, folder: &Path, ort: &runtime::SessionConfig) -> anyhow::Result<Evaluation> {
    use modelspec::preprocess;
    let mut m = runtime::OnnxModel::load(onnx, ort)?;
    let desc = m.info.description.clone();
    let mut items = Vec::new();
    for (label, class) in desc.classes.iter().enumerate() {
        let mut files = verify::walk(&folder.join(class))?;
        files.sort();
        items.extend(files.into_iter().map(|f| (f, label)));
    }
    anyhow::ensure!(!items.is_empty(), "{}: no images in class folders {:?}", folder.display(), desc.classes);
    let (mut correct, mut images, mut unreadable) = (0, 0, Vec::new());
    for chunk in items.chunks(32) {
        let (mut batch, mut labels) = (Vec::new(), Vec::new());
        for (f, label) in chunk {
            let px = std::fs::read(f).map_err(anyhow::Error::from).and_then(|b| {
                Ok(preprocess::resized_pixels(
                    &b,
                    desc.input_size as u32,
                    &desc.preprocessing,
                    preprocess::DEFAULT_MAX_PIXELS,
                )?)
            });
            match px {
                Ok(px) => {
                    batch.extend(px);
                    labels.push(*label);
                }
                Err(e) => unreadable.push(format!("{}: {e}", f.display())),
            }
        }
        if labels.is_empty() {
            continue;
        }
        let preds = m.run(batch, labels.len())?;
        for (p, l) in preds.iter().zip(&labels) {
            let top = p.probabilities.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
            correct += usize::from(top == Some(*l));
        }
        images += labels.len();
    }
    let reported_accuracy =
        desc.metrics.as_ref().and_then(|m| m.get("test_accuracy")).and_then(serde_json::Value::as_f64);
    Ok(Evaluation {
        file: onnx.display().to_string(),
        folder: folder.display().to_string(),
        images,
        correct,
        accuracy: correct as f64 / images.max(1) as f64,
        reported_accuracy,
        unreadable,
    })
}
