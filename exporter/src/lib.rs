//! The exporter: a model directory (a training run, or a model imported from Keras) → one
//! self-describing `model.onnx`, verified against the Candle model before it replaces anything.

pub mod calibrate;
pub use onnxgraph as graph;
pub mod int8;
pub mod ood;
pub mod photos;
pub mod triton;
pub mod verify;

use anyhow::{bail, Context};
use candle_core::Device;
use graph::{OnnxPrecision, Weights};
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
    pub precision: OnnxPrecision,
    pub input_type: onnx_meta::InputType,
    pub model_version: i64,
    /// Verify before the file replaces the previous one.
    pub verify: bool,
    /// Sample images for the verification (files or folders); empty: the photos the run held
    /// out (its test split, else its validation split: `photos::held_out`), else synthetic images.
    pub samples: Vec<PathBuf>,
    pub max_samples: usize,
    /// Also run the file through candle-onnx.
    pub candle_onnx: bool,
    /// Largest absolute difference of logits accepted (1e-4 for float32).
    pub tolerance: f32,
    /// Test-time flip averaging in the graph: each image and its mirror image, outputs averaged.
    pub flip_average: bool,
    /// The out-of-distribution output (when the run has its fit), its threshold set to reject
    /// this share of the validation photos; `None`: no such output.
    pub ood_rejection: Option<f64>,
    pub ort: inference::SessionConfig,
}

/// What an export produced.
#[derive(Debug)]
pub struct Exported {
    pub path: PathBuf,
    pub bytes: usize,
    /// The out-of-distribution output's threshold, when the file has it.
    pub ood: Option<onnx_meta::OodMeta>,
    pub report: Option<verify::Report>,
    pub report_path: Option<PathBuf>,
}

/// The weights of a model directory as plain arrays.
pub fn load_weights(dir: &ModelDir) -> anyhow::Result<Weights> {
    dir.tensors.iter().map(|(k, t)| Ok((k.clone(), (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?)))).collect()
}

/// A hidden scratch path beside `out` (`.model.onnx.<what>-<pid>`), its folder created.
pub fn beside(out: &Path, what: &str) -> anyhow::Result<PathBuf> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out.file_name().context("the output needs a file name")?.to_string_lossy().into_owned();
    Ok(parent.join(format!(".{name}.{what}-{}", std::process::id())))
}

/// Writes `bytes` to a temporary file beside `out` (renamed over it once verified).
pub fn write_beside(out: &Path, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let tmp = beside(out, "tmp")?;
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    Ok(tmp)
}

/// The metadata property that builds flip averaging into the graph, if asked for.
pub fn flip_property(o: &ExportOptions) -> Option<(String, String)> {
    o.flip_average.then(|| (onnx_meta::TEST_TIME_AUGMENTATION.into(), onnx_meta::FLIP.into()))
}

/// Where the verification report of `out` goes: `model.onnx` → `model.verification.json`.
pub fn report_path(out: &Path) -> PathBuf {
    out.with_extension("verification.json")
}

/// Exports `o.run_dir` to `o.out`: graph, metadata, atomic write, verification.
pub fn export(o: &ExportOptions) -> anyhow::Result<Exported> {
    let dir = ModelDir::load(&o.run_dir, &Device::Cpu)
        .with_context(|| format!("reading the model directory {}", o.run_dir.display()))?;
    let desc = &dir.description;
    let mut weights = load_weights(&dir)?;
    if let Some(rate) = o.ood_rejection {
        ood::check_rate(rate)?;
    }
    let fit = match o.ood_rejection {
        Some(_) => ood::add_fit(&o.run_dir, desc, &mut weights)?,
        None => None,
    };
    let toolchain = format!("{PRODUCER} {} (opset {})", env!("CARGO_PKG_VERSION"), graph::OPSET);
    let mut props = onnx_meta::properties(desc, o.input_type, o.model_version, &toolchain);
    let precision = match o.precision {
        OnnxPrecision::F32 => onnx_meta::Precision::Float32,
        OnnxPrecision::F16 => onnx_meta::Precision::Float16,
    };
    props.push((onnx_meta::PRECISION.into(), precision.as_str().into()));
    props.extend(flip_property(o));
    let mut model = graph::build(
        desc,
        &weights,
        o.precision,
        o.input_type,
        &props,
        o.model_version,
        (PRODUCER, env!("CARGO_PKG_VERSION")),
    )?;
    drop(weights);
    let mut bytes = model.encode_to_vec();

    // Written beside the target and renamed over it only once verified.
    let tmp = write_beside(&o.out, &bytes)?;
    let cleanup = |e: anyhow::Error| {
        let _ = std::fs::remove_file(&tmp);
        e
    };

    let mut report = None;
    if o.verify {
        let samples = if !o.samples.is_empty() {
            verify::Samples::from_paths(&o.samples, desc, o.max_samples).map_err(cleanup)?
        } else if let Some((files, _)) = photos::held_out(&o.run_dir, desc).map_err(cleanup)? {
            let per_class = (o.max_samples / desc.classes.len().max(1)).max(1);
            let files = photos::per_class(&files, desc.classes.len(), per_class);
            verify::Samples::from_paths(&files, desc, usize::MAX).map_err(cleanup)?
        } else {
            verify::Samples::synthetic(desc, o.max_samples.min(4))
        };
        let r = verify::verify(&tmp, &samples, &dir, fit.as_ref().map(|f| &f.0), o).map_err(cleanup)?;
        if !r.passed {
            let _ = std::fs::remove_file(&tmp);
            bail!("{r}\nthe ONNX file does not match the model; {} was left unchanged", o.out.display());
        }
        report = Some(r);
    }
    // The threshold, through the file as written (the metadata does not change its scores).
    let mut ood_meta = None;
    if let (Some((_, info)), Some(rate)) = (&fit, o.ood_rejection) {
        let meta = ood::set_threshold(&bytes, &o.out, &o.run_dir, desc, rate, info, &o.ort).map_err(cleanup)?;
        ood::put_meta(&mut model, &meta).map_err(cleanup)?;
        bytes = model.encode_to_vec();
        std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display())).map_err(cleanup)?;
        ood_meta = Some(meta);
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
    Ok(Exported { path: o.out.clone(), bytes: bytes.len(), ood: ood_meta, report, report_path })
}
