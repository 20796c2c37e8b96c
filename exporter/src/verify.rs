//! Proof that a written ONNX file computes what the Candle model computes: the same sample
//! images through the Candle model (the reference), through ONNX Runtime (the engine the
//! runtime uses) and through candle-onnx (a second, independent reader of the file). Files with
//! the out-of-distribution output are checked on it too, against [`models::ood::Ood::scores`] of
//! the Candle model's pooled features.

use anyhow::Context;
use candle_core::{Device, ModuleT, Tensor};
use models::classifier::Classifier;
use models::ood::Ood;
use models::weights::ModelDir;
use models::xception::XceptionOptions;
use modelspec::onnx_meta::{InputType, INPUT_NAME, LOGITS_NAME, OOD_SCORE_NAME};
use modelspec::preprocess::{self, decode_batch, image_files, DecodeLimits, Source};
use modelspec::ModelDescription;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Sample images, decoded and resized to the model's input: `size * size * 3` bytes each.
pub struct Samples {
    pub names: Vec<String>,
    pub pixels: Vec<Vec<u8>>,
}

impl Samples {
    /// Reads image files (or every image of the folders given), at most `max`; a sample that
    /// cannot be read is an error naming it.
    pub fn from_paths(paths: &[PathBuf], desc: &ModelDescription, max: usize) -> anyhow::Result<Self> {
        let mut files = Vec::new();
        for p in paths {
            if p.is_dir() {
                files.extend(image_files(p).with_context(|| format!("samples {}", p.display()))?);
            } else {
                files.push(p.clone());
            }
        }
        files.truncate(max);
        let sources: Vec<Source> = files.iter().map(|f| Source::File(f)).collect();
        let batch = decode_batch(&sources, desc.input_size as u32, &desc.preprocessing, &DecodeLimits::default());
        if let Some((i, e)) = batch.failed.first() {
            anyhow::bail!("sample {}: {e}", files[*i].display());
        }
        anyhow::ensure!(!batch.is_empty(), "no sample images in {paths:?}");
        let pixels = (0..batch.len()).map(|i| batch.image(i).to_vec()).collect();
        Ok(Samples { names: files.iter().map(|f| f.display().to_string()).collect(), pixels })
    }

    /// Deterministic synthetic images (gradients and noise) when no photo is at hand.
    pub fn synthetic(desc: &ModelDescription, n: usize) -> Self {
        let s = desc.input_size;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut pixels = Vec::new();
        for i in 0..n {
            let mut img = Vec::with_capacity(s * s * 3);
            for y in 0..s {
                for x in 0..s {
                    for c in 0..3 {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let grad = ((x * (c + 1) + y * (i + 1)) * 255 / (2 * s)) as u64;
                        img.push(((grad + (state % 64)) % 256) as u8);
                    }
                }
            }
            pixels.push(img);
        }
        Samples { names: (0..n).map(|i| format!("synthetic-{i}")).collect(), pixels }
    }

    pub fn len(&self) -> usize {
        self.pixels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    fn batch(&self) -> Vec<u8> {
        self.pixels.concat()
    }
}

/// One engine's agreement with the Candle model.
#[derive(Debug, Clone, Serialize)]
pub struct EngineCheck {
    pub engine: String,
    /// `None` when the engine could not run the file (then `note` says why).
    pub max_abs_diff_logits: Option<f32>,
    pub max_abs_diff_probabilities: Option<f32>,
    pub same_top_class: Option<usize>,
    /// Largest `|Δ ood_score| / max(1, |reference|)`, in files with the output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rel_diff_ood_score: Option<f32>,
    pub passed: bool,
    pub note: String,
}

impl EngineCheck {
    /// An engine that could not run the file; `passed` says whether that is acceptable.
    fn not_run(engine: String, passed: bool, note: String) -> Self {
        Self {
            engine,
            max_abs_diff_logits: None,
            max_abs_diff_probabilities: None,
            same_top_class: None,
            max_rel_diff_ood_score: None,
            passed,
            note,
        }
    }
}

/// The verification report, printed and stored beside the file.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub file: String,
    pub samples: Vec<String>,
    pub tolerance_logits: f32,
    /// Largest relative difference of `ood_score` accepted, in files with the output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tolerance_ood_score: Option<f32>,
    pub reference: String,
    pub engines: Vec<EngineCheck>,
    /// Every required engine agreed (ONNX Runtime is required; candle-onnx where it can run).
    pub passed: bool,
}

/// The Candle model's outputs for the samples: logits [n · k] and, with `ood`, the score of
/// each sample's pooled features.
struct Reference {
    logits: Vec<f32>,
    classes: usize,
    ood: Option<Vec<f32>>,
}

/// Reference outputs from the Candle model of the run directory. With `flip`, the mean of the
/// logits of each sample and of its mirror image, and the score of the mean of their features
/// (what a flip-averaging graph outputs).
fn candle_reference(dir: &ModelDir, samples: &Samples, flip: bool, ood: Option<&Ood>) -> anyhow::Result<Reference> {
    let dev = Device::Cpu;
    let desc = &dir.description;
    let model = Classifier::new(desc, dir.var_builder(&dev), XceptionOptions::default())?;
    let s = desc.input_size;
    let (mut all, mut scores) = (Vec::new(), Vec::new());
    let mut k = 0;
    let outputs = |x: Tensor| -> anyhow::Result<(Tensor, Tensor)> {
        let f = model.features(&x)?;
        let y = match &model.head {
            Some(h) => h.forward_t(&f, false)?,
            None => f.clone(),
        };
        Ok((y, f))
    };
    for chunk in samples.pixels.chunks(8) {
        let mut input = Vec::with_capacity(chunk.len() * s * s * 3);
        for px in chunk {
            anyhow::ensure!(px.len() == s * s * 3, "a sample of {} bytes for a {s} px model", px.len());
            input.extend(preprocess::scale_pixels(px, &desc.preprocessing));
        }
        let (mut y, mut f) = outputs(Tensor::from_vec(input, (chunk.len(), s, s, 3), &dev)?)?;
        if flip {
            let mut mirrored = Vec::with_capacity(chunk.len() * s * s * 3);
            for px in chunk {
                mirrored.extend(preprocess::scale_pixels(&preprocess::mirror_rgb(px, s), &desc.preprocessing));
            }
            let (my, mf) = outputs(Tensor::from_vec(mirrored, (chunk.len(), s, s, 3), &dev)?)?;
            y = ((y + my)? * 0.5)?;
            f = ((f + mf)? * 0.5)?;
        }
        k = y.dim(1)?;
        all.extend(y.flatten_all()?.to_vec1::<f32>()?);
        if let Some(o) = ood {
            scores.extend(o.scores(&f.flatten_all()?.to_vec1::<f32>()?));
        }
    }
    Ok(Reference { logits: all, classes: k, ood: ood.map(|_| scores) })
}

fn softmax_rows(x: &[f32], k: usize) -> Vec<f32> {
    x.chunks(k)
        .flat_map(|r| {
            let m = r.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = r.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(move |v| v / s)
        })
        .collect()
}

fn argmax_rows(x: &[f32], k: usize) -> Vec<usize> {
    x.chunks(k).map(|r| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)).collect()
}

/// One engine's outputs: logits [n · k] and the `ood_score` of each sample where the file has it.
struct Got {
    logits: Vec<f32>,
    ood: Option<Vec<f32>>,
}

fn compare(engine: &str, want: &Reference, got: &Got, tol: f32, tol_ood: f32) -> EngineCheck {
    let mut c = compare_logits(engine, &want.logits, &got.logits, want.classes, tol);
    if let Some(w) = &want.ood {
        let d = match &got.ood {
            Some(g) if g.len() == w.len() => {
                w.iter().zip(g).map(|(a, b)| (a - b).abs() / a.abs().max(1.0)).fold(0f32, |m, x| m.max(x))
            }
            _ => f32::INFINITY,
        };
        // NaN is a failure too.
        let ok = d <= tol_ood;
        c.max_rel_diff_ood_score = Some(d);
        if !ok {
            c.passed = false;
            let note = format!("{OOD_SCORE_NAME} differs: max relative |diff| {d:.3e} > {tol_ood:.1e}");
            c.note = if c.note.is_empty() { note } else { format!("{}; {note}", c.note) };
        }
    }
    c
}

fn compare_logits(engine: &str, want: &[f32], got: &[f32], k: usize, tol: f32) -> EngineCheck {
    let d = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let (pw, pg) = (softmax_rows(want, k), softmax_rows(got, k));
    let same = argmax_rows(want, k).iter().zip(argmax_rows(got, k)).filter(|(a, b)| **a == *b).count();
    let n = want.len() / k;
    let dl = if want.len() == got.len() { d(want, got) } else { f32::INFINITY };
    let passed = dl <= tol && same == n;
    EngineCheck {
        engine: engine.into(),
        max_abs_diff_logits: Some(dl),
        max_abs_diff_probabilities: Some(d(&pw, &pg)),
        same_top_class: Some(same),
        max_rel_diff_ood_score: None,
        passed,
        note: if passed { String::new() } else { format!("differs: max |diff| {dl:.3e} > {tol:.1e} or top class") },
    }
}

/// An error's message without the backtrace some Candle errors carry.
fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or_default().to_string()
}

/// Runs the checks on the file `onnx_path` (already written, not yet renamed to `o.out`, which
/// is how the report calls it) against the Candle model of `o.run_dir`.
/// `ood` is the run's out-of-distribution fit when the file has the output.
pub fn verify(
    onnx_path: &Path,
    samples: &Samples,
    dir: &ModelDir,
    ood: Option<&Ood>,
    o: &crate::ExportOptions,
) -> anyhow::Result<Report> {
    let (name, run_dir, tol, ort) = (&o.out, &o.run_dir, o.tolerance, &o.ort);
    let (with_candle_onnx, input_type) = (o.candle_onnx, o.input_type);
    let tol_ood = ood_tolerance(o.precision);
    let bytes = std::fs::read(onnx_path).with_context(|| format!("reading back {}", onnx_path.display()))?;
    let want = candle_reference(dir, samples, o.flip_average, ood)?;
    let prep = &dir.description.preprocessing;
    let (scale, offset) = (prep.scale as f64, prep.offset as f64);
    let n = samples.len();
    let mut engines = Vec::new();

    // ONNX Runtime, through the runtime's own loader: required.
    let ort_check = (|| -> anyhow::Result<Got> {
        let mut m = inference::OnnxModel::from_bytes(&bytes, onnx_path, ort)?;
        let preds = m.run(samples.batch(), n)?;
        let ood = preds.iter().map(|p| p.ood_score).collect::<Option<Vec<f32>>>();
        Ok(Got { logits: preds.into_iter().flat_map(|p| p.logits).collect(), ood })
    })();
    let engine = format!("onnxruntime {} (CPU)", inference::ortlib::ORT_VERSION);
    engines.push(match ort_check {
        Ok(got) => compare(&engine, &want, &got, tol, tol_ood),
        Err(e) => EngineCheck::not_run(engine, false, first_line(&e)),
    });

    // candle-onnx: an independent reader; reported, required only when it runs.
    if with_candle_onnx {
        let engine = "candle-onnx 0.11 (CPU)".to_string();
        let run = (|| -> anyhow::Result<Got> {
            use prost::Message;
            let model = crate::graph::with_explicit_pads(candle_onnx::onnx::ModelProto::decode(bytes.as_slice())?);
            let (mut got, mut scores) = (Vec::new(), Vec::new());
            // One image at a time: candle-onnx keeps every intermediate value alive.
            for px in &samples.pixels {
                let side = ((px.len() / 3) as f64).sqrt().round() as usize;
                let x = Tensor::from_vec(px.clone(), (1, side, side, 3), &Device::Cpu)?;
                // A float32-input file takes the scaled pixels.
                let x = match input_type {
                    InputType::Uint8 => x,
                    InputType::Float32 => x.to_dtype(candle_core::DType::F32)?.affine(scale, offset)?,
                };
                let out = candle_onnx::simple_eval(&model, HashMap::from([(INPUT_NAME.to_string(), x)]))?;
                let l = out.get(LOGITS_NAME).context("no logits output")?;
                got.extend(l.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
                if want.ood.is_some() {
                    let s = out.get(OOD_SCORE_NAME).with_context(|| format!("no {OOD_SCORE_NAME} output"))?;
                    scores.extend(s.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
                }
            }
            Ok(Got { logits: got, ood: want.ood.as_ref().map(|_| scores) })
        })();
        engines.push(match run {
            Ok(got) => compare(&engine, &want, &got, tol, tol_ood),
            Err(e) => {
                EngineCheck::not_run(engine, true, format!("could not run the file (not counted): {}", first_line(&e)))
            }
        });
    }
    let passed = engines.iter().all(|e| e.passed);
    Ok(Report {
        file: name.display().to_string(),
        samples: samples.names.clone(),
        tolerance_logits: tol,
        tolerance_ood_score: want.ood.as_ref().map(|_| tol_ood),
        reference: format!("Candle model of {}", run_dir.display()),
        engines,
        passed,
    })
}

/// Largest relative difference of `ood_score` accepted: its whitening magnifies the features'
/// rounding (float16: about 1e-3 of each feature).
pub fn ood_tolerance(precision: crate::graph::OnnxPrecision) -> f32 {
    match precision {
        crate::graph::OnnxPrecision::F32 => 1e-3,
        crate::graph::OnnxPrecision::F16 => 5e-2,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "verification of {} on {} samples (reference: {})", self.file, self.samples.len(), self.reference)?;
        for e in &self.engines {
            let fmt = |v: Option<f32>| v.map(|v| format!("{v:.2e}")).unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "  {:<28} max|Δlogits| {:>9}  max|Δprob| {:>9}  same top class {:>3}/{}{}  {}{}",
                e.engine,
                fmt(e.max_abs_diff_logits),
                fmt(e.max_abs_diff_probabilities),
                e.same_top_class.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                self.samples.len(),
                match (self.tolerance_ood_score, e.max_rel_diff_ood_score) {
                    (Some(_), d) => format!("  max rel|Δood_score| {:>9}", fmt(d)),
                    (None, _) => String::new(),
                },
                if e.passed { "ok" } else { "FAILED" },
                if e.note.is_empty() { String::new() } else { format!(" ({})", e.note) }
            )?;
        }
        write!(
            f,
            "  tolerance {:.0e} on logits{}: {}",
            self.tolerance_logits,
            self.tolerance_ood_score.map(|t| format!(", {t:.0e} relative on {OOD_SCORE_NAME}")).unwrap_or_default(),
            if self.passed { "PASSED" } else { "FAILED" }
        )
    }
}
