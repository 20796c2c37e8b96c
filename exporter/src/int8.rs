//! `exporter RUN_DIR --precision int8`: post-training static quantization, in Rust.
//!
//! 1. Calibration ([`crate::calibrate`]): activation ranges from a few hundred training photos
//!    run through the Candle model.
//! 2. The int8 QDQ graph ([`onnxgraph::build_int8`]): per-channel int8 weights, uint8
//!    activations, metadata saying `precision: int8` and how it was calibrated.
//! 3. Verification on labelled photos (the run's test split by default) through ONNX Runtime,
//!    against the float file of the same weights: the same top class on at least 99.5% of the
//!    photos, accuracy within 0.3 points, and ONNX Runtime's optimized graph has integer
//!    operators where the file has QDQ convolutions (no float `Conv` left but the layers kept
//!    float). Only a file that passes replaces the previous one, and its report
//!    (`model.int8.verification.json`) goes beside it; a failure names the check that failed.

use crate::calibrate::{self, Calibration, CalibrationOptions};
use crate::graph::{self, OnnxPrecision};
use crate::{load_weights, ExportOptions, Exported, PRODUCER};
use anyhow::{bail, Context};
use candle_core::Device;
use inference::batch::predict_files;
use inference::evaluate::{scores, Scores};
use inference::OnnxModel;
use models::weights::ModelDir;
use modelspec::onnx_meta::{self, Precision};
use modelspec::ModelDescription;
use prost::Message;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// How to quantize and what to demand of the result.
#[derive(Debug, Clone)]
pub struct Int8Options {
    pub calibration: CalibrationOptions,
    /// Layers that keep float weights (`block1_conv1`, `block14_sepconv2`, `head_logits`, ...).
    pub keep_float: Vec<String>,
    /// Range of the int8 weights: 7 bits (−63..63, the default) run correctly on every x86 CPU;
    /// 8 bits only on CPUs with VNNI (elsewhere ONNX Runtime's kernels saturate; see
    /// `onnxgraph::quant`).
    pub weight_bits: u8,
    /// Labelled folder of the verification (`<class>/...`); default: the photos the run held out
    /// (its test split, else validation: `photos::held_out`).
    pub verify_on: Option<PathBuf>,
    /// Least share of photos whose top class must equal the float file's.
    pub min_agreement: f64,
    /// Largest accuracy loss against the float file, as a fraction (0.003: 0.3 points).
    pub max_accuracy_drop: f64,
    /// When the file fails its verification, try once more with the other calibration method.
    pub fallback: bool,
}

impl Default for Int8Options {
    fn default() -> Self {
        Self {
            calibration: CalibrationOptions::default(),
            keep_float: vec![],
            weight_bits: onnxgraph::PORTABLE_WEIGHT_BITS,
            verify_on: None,
            min_agreement: 0.995,
            max_accuracy_drop: 0.003,
            fallback: true,
        }
    }
}

/// One requirement of the verification.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub value: String,
    pub limit: String,
    pub passed: bool,
}

/// The verification report of an int8 file.
#[derive(Debug, Clone, Serialize)]
pub struct Int8Report {
    pub file: String,
    pub precision: Precision,
    pub calibration: Calibration,
    pub graph: onnxgraph::Int8Summary,
    /// Node types of the graph ONNX Runtime runs after its optimizations, with counts.
    pub optimized_ops: BTreeMap<String, usize>,
    pub folder: String,
    pub images: usize,
    /// Photos whose top class is the float file's, as a fraction.
    pub agreement: f64,
    pub float32: Scores,
    pub int8: Scores,
    pub checks: Vec<Check>,
    pub passed: bool,
    /// Files tried before this one that failed their verification (another calibration method).
    pub failed_attempts: Vec<String>,
    /// The out-of-distribution threshold set on this file's own scores, when it has the output.
    pub ood: Option<onnx_meta::OodMeta>,
}

impl Int8Report {
    /// One line: the calibration method and each check's value.
    pub fn summary(&self) -> String {
        let checks: Vec<String> = self
            .checks
            .iter()
            .map(|c| format!("{} {} ({}{})", c.name, c.value, c.limit, if c.passed { "" } else { ", FAILED" }))
            .collect();
        format!("{}: {}", self.calibration.method.as_str(), checks.join("; "))
    }
}

impl std::fmt::Display for Int8Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "int8 verification of {} on {} ({} photos): same top class as float32 on {:.2}%; accuracy {:.2}% (float32 {:.2}%), macro-F1 {:.4} (float32 {:.4})",
            self.file,
            self.folder,
            self.images,
            100.0 * self.agreement,
            100.0 * self.int8.accuracy,
            100.0 * self.float32.accuracy,
            self.int8.macro_f1,
            self.float32.macro_f1
        )?;
        for a in &self.failed_attempts {
            writeln!(f, "  (tried first, failed: {a})")?;
        }
        for c in &self.checks {
            writeln!(f, "  [{}] {}: {} (limit {})", if c.passed { "ok" } else { "FAILED" }, c.name, c.value, c.limit)?;
        }
        write!(f, "{}", if self.passed { "passed" } else { "FAILED" })
    }
}

/// Predicted class of each file that could be read.
fn predictions(model: &mut OnnxModel, files: &[PathBuf]) -> anyhow::Result<HashMap<PathBuf, usize>> {
    let r = predict_files(model, files, 32)?;
    Ok(r.predicted.into_iter().map(|(f, p)| (f, p.top_class().unwrap_or(0))).collect())
}

/// Writes the int8 file of `o.run_dir` to `o.out`, verified unless `o.verify` is off.
pub fn export_int8(o: &ExportOptions, q: &Int8Options) -> anyhow::Result<(Exported, Option<Int8Report>)> {
    let dir = ModelDir::load(&o.run_dir, &Device::Cpu)
        .with_context(|| format!("reading the model directory {}", o.run_dir.display()))?;
    let desc = dir.description.clone();
    if desc.head.is_none() {
        bail!("--precision int8: the model has no classifier head to verify");
    }
    let mut weights = load_weights(&dir)?;
    drop(dir);
    if let Some(rate) = o.ood_rejection {
        crate::ood::check_rate(rate)?;
    }
    // The out-of-distribution output stays float (`onnxgraph::quant`); its threshold is set
    // on this file's own scores once it passes.
    let fit = match o.ood_rejection {
        Some(_) => crate::ood::add_fit(&o.run_dir, &desc, &mut weights)?,
        None => None,
    };

    if q.weight_bits > onnxgraph::PORTABLE_WEIGHT_BITS {
        tracing::warn!(
            "{}-bit int8 weights: this file runs correctly only on CPUs with VNNI (AVX512-VNNI, \
             AVX-VNNI); elsewhere the runtime refuses it",
            q.weight_bits
        );
    }
    let toolchain = format!("{PRODUCER} {} (opset {})", env!("CARGO_PKG_VERSION"), graph::OPSET);
    // Before the calibration's minutes: a missing verification folder fails at once.
    let mut verifier = Verifier::new(o, q, &desc, &weights, &toolchain)?;
    let (photos, source) = calibrate::photos(&q.calibration, &o.run_dir, &desc)?;
    let t = std::time::Instant::now();
    let calibrated = calibrate::calibrate(&o.run_dir, &photos, &q.calibration)?;
    tracing::info!(
        "calibrated {} activations on {} photos from {source} in {:.0} s",
        calibrated.activations(),
        calibrated.used,
        t.elapsed().as_secs_f64()
    );
    let keep: HashSet<String> = q.keep_float.iter().cloned().collect();
    // Neither method is safe alone (docs/training.md: on one model MinMax passes and the
    // percentile fails, on another the reverse), so a file that fails its verification gets one
    // more try with the other method. The second file must pass the same checks; no labels
    // choose between two passing files, the first that passes is kept.
    let first = q.calibration.method;
    let methods = if q.fallback && o.verify { vec![first, first.other()] } else { vec![first] };
    let mut failed: Vec<Int8Report> = Vec::new();
    for method in methods {
        let ranges = calibrated.ranges(method);
        let calibration = Calibration {
            method,
            percentile: (method == calibrate::Method::Percentile).then_some(q.calibration.percentile),
            photos: calibrated.used,
            seed: q.calibration.seed,
            source: source.clone(),
            activations: ranges.len(),
            weight_bits: q.weight_bits,
        };
        let mut props = onnx_meta::properties(&desc, o.input_type, o.model_version, &toolchain);
        props.push((onnx_meta::PRECISION.into(), Precision::Int8.as_str().into()));
        props.push((onnx_meta::CALIBRATION.into(), serde_json::to_string(&calibration)?));
        props.extend(crate::flip_property(o));
        let (mut model, summary) = onnxgraph::build_int8(
            &desc,
            &weights,
            o.input_type,
            &props,
            o.model_version,
            (PRODUCER, env!("CARGO_PKG_VERSION")),
            &ranges,
            &keep,
            q.weight_bits,
        )?;
        let mut bytes = model.encode_to_vec();
        let tmp = crate::write_beside(&o.out, &bytes)?;
        let report = match verifier.verify(&tmp, &model, &keep, &calibration, &summary) {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.context(format!("{} was left unchanged", o.out.display())));
            }
        };
        match report {
            Some(mut r) if !r.passed => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!("int8 file calibrated with {}: {}", method.as_str(), r.summary());
                r.failed_attempts = failed.iter().map(Int8Report::summary).collect();
                failed.push(r);
            }
            report => {
                let mut ood_meta = None;
                if let (Some((_, info)), Some(rate)) = (&fit, o.ood_rejection) {
                    let meta = crate::ood::set_threshold(&bytes, &o.out, &o.run_dir, &desc, rate, info, &o.ort)
                        .and_then(|m| {
                            crate::ood::put_meta(&mut model, &m)?;
                            bytes = model.encode_to_vec();
                            std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
                            Ok(m)
                        });
                    match meta {
                        Ok(m) => ood_meta = Some(m),
                        Err(e) => {
                            let _ = std::fs::remove_file(&tmp);
                            return Err(e.context(format!("{} was left unchanged", o.out.display())));
                        }
                    }
                }
                std::fs::rename(&tmp, &o.out)
                    .with_context(|| format!("renaming {} to {}", tmp.display(), o.out.display()))?;
                let report = report.map(|mut r| {
                    r.failed_attempts = failed.iter().map(Int8Report::summary).collect();
                    r.ood = ood_meta.clone();
                    r
                });
                let report_path = match &report {
                    Some(r) => {
                        if !r.failed_attempts.is_empty() {
                            tracing::info!("the {} calibration's file passes: it is the one written", method.as_str());
                        }
                        let p = crate::report_path(&o.out);
                        std::fs::write(&p, serde_json::to_string_pretty(r)?)
                            .with_context(|| format!("writing {}", p.display()))?;
                        Some(p)
                    }
                    None => None,
                };
                let e = Exported { path: o.out.clone(), bytes: bytes.len(), ood: ood_meta, report: None, report_path };
                return Ok((e, report));
            }
        }
    }
    let reports: Vec<String> = failed.iter().map(|r| r.to_string()).collect();
    bail!(
        "{}\nthe int8 file fails its verification with {}; {} was left unchanged",
        reports.join("\n"),
        failed.iter().map(|r| r.calibration.method.as_str()).collect::<Vec<_>>().join(" and with "),
        o.out.display()
    )
}

/// The verification of int8 files against the float file of the same weights, whose
/// predictions are computed once for every file tried.
struct Verifier<'a> {
    o: &'a ExportOptions,
    q: &'a Int8Options,
    /// The labelled photos, and the float file's predictions on them (on the first use).
    files: Vec<(PathBuf, usize)>,
    /// Where the verification photos came from (a folder, or a split of the run).
    folder: String,
    float_pred: Option<HashMap<PathBuf, usize>>,
    float_model: Option<candle_onnx::onnx::ModelProto>,
    classes: usize,
}

impl<'a> Verifier<'a> {
    fn new(
        o: &'a ExportOptions,
        q: &'a Int8Options,
        desc: &ModelDescription,
        weights: &graph::Weights,
        toolchain: &str,
    ) -> anyhow::Result<Self> {
        let mut v = Self {
            o,
            q,
            files: vec![],
            folder: String::new(),
            float_pred: None,
            float_model: None,
            classes: desc.classes.len(),
        };
        if !o.verify {
            return Ok(v);
        }
        let unchanged = || format!("{} was left unchanged", o.out.display());
        (v.files, v.folder) = match &q.verify_on {
            Some(f) => (crate::photos::labelled(f, &desc.classes).with_context(unchanged)?, f.display().to_string()),
            None => match crate::photos::held_out(&o.run_dir, desc).with_context(unchanged)? {
                Some(found) => found,
                None => bail!(
                    "int8 files are verified on labelled photos: the run names no test or validation photos; pass \
                     --verify-on FOLDER; {} was left unchanged",
                    o.out.display()
                ),
            },
        };
        let mut float_props = onnx_meta::properties(desc, o.input_type, o.model_version, toolchain);
        float_props.extend(crate::flip_property(o));
        v.float_model = Some(graph::build(
            desc,
            weights,
            OnnxPrecision::F32,
            o.input_type,
            &float_props,
            o.model_version,
            (PRODUCER, env!("CARGO_PKG_VERSION")),
        )?);
        Ok(v)
    }

    /// Verifies the int8 file written at `tmp` (`None` when verification is off).
    fn verify(
        &mut self,
        tmp: &Path,
        model: &candle_onnx::onnx::ModelProto,
        keep: &HashSet<String>,
        calibration: &Calibration,
        summary: &onnxgraph::Int8Summary,
    ) -> anyhow::Result<Option<Int8Report>> {
        let (o, q) = (self.o, self.q);
        if !o.verify {
            return Ok(None);
        }
        let paths: Vec<PathBuf> = self.files.iter().map(|(f, _)| f.clone()).collect();
        if self.float_pred.is_none() {
            let bytes = self.float_model.take().expect("built with the verifier").encode_to_vec();
            let mut float = OnnxModel::from_bytes(&bytes, &o.run_dir.join("<float32>"), &o.ort)?;
            self.float_pred = Some(predictions(&mut float, &paths)?);
        }
        let float_pred = self.float_pred.as_ref().expect("computed above");
        let optimized = crate::beside(&o.out, "optimized")?;
        let result = (|| -> anyhow::Result<(HashMap<PathBuf, usize>, BTreeMap<String, usize>)> {
            let cfg = inference::SessionConfig { optimized_model: Some(optimized.clone()), ..o.ort.clone() };
            let mut int8 = OnnxModel::load(tmp, &cfg)?;
            anyhow::ensure!(
                int8.info.precision == Precision::Int8,
                "the int8 file's metadata says {}",
                int8.info.precision
            );
            let int8_pred = predictions(&mut int8, &paths)?;
            drop(int8);
            let opt = std::fs::read(&optimized).with_context(|| format!("reading {}", optimized.display()))?;
            Ok((int8_pred, onnxgraph::quant::op_counts(&candle_onnx::onnx::ModelProto::decode(opt.as_slice())?)))
        })();
        let _ = std::fs::remove_file(&optimized);
        let (int8_pred, optimized_ops) = result?;

        // Photos both files could read (the same ones: same decoder).
        let both: Vec<&(PathBuf, usize)> =
            self.files.iter().filter(|(f, _)| float_pred.contains_key(f) && int8_pred.contains_key(f)).collect();
        let truth: Vec<usize> = both.iter().map(|(_, l)| *l).collect();
        let fp: Vec<usize> = both.iter().map(|(f, _)| float_pred[f]).collect();
        let ip: Vec<usize> = both.iter().map(|(f, _)| int8_pred[f]).collect();
        let (fs, is) = (scores(&fp, &truth, self.classes), scores(&ip, &truth, self.classes));
        let agreement = fp.iter().zip(&ip).filter(|(a, b)| a == b).count() as f64 / both.len().max(1) as f64;
        // Float convolutions ONNX Runtime still runs, beyond those kept float on purpose.
        let kept_convs = model
            .graph
            .iter()
            .flat_map(|g| &g.node)
            .filter(|n| n.op_type == "Conv" && keep.contains(n.name.split('/').next().unwrap_or_default()))
            .count();
        let float_convs: usize =
            ["Conv", "FusedConv", "NchwcConv"].iter().map(|op| optimized_ops.get(*op).copied().unwrap_or(0)).sum();
        let int_convs: usize =
            optimized_ops.iter().filter(|(op, _)| op.starts_with("QLinearConv")).map(|(_, n)| n).sum();
        let checks = vec![
            Check {
                name: "same top class as the float32 file".into(),
                value: format!("{:.2}%", 100.0 * agreement),
                limit: format!(">= {:.2}%", 100.0 * q.min_agreement),
                passed: agreement >= q.min_agreement,
            },
            Check {
                name: "accuracy against the float32 file".into(),
                value: format!("{:+.2} points", 100.0 * (is.accuracy - fs.accuracy)),
                limit: format!(">= -{:.2} points", 100.0 * q.max_accuracy_drop),
                passed: is.accuracy >= fs.accuracy - q.max_accuracy_drop - 1e-12,
            },
            Check {
                name: "convolutions ONNX Runtime runs in integer arithmetic".into(),
                value: format!("{int_convs} QLinearConv, {float_convs} float Conv"),
                limit: format!("float Conv <= {kept_convs} (kept float)"),
                passed: float_convs <= kept_convs && int_convs > 0,
            },
        ];
        let passed = checks.iter().all(|c| c.passed);
        Ok(Some(Int8Report {
            file: o.out.display().to_string(),
            precision: Precision::Int8,
            calibration: calibration.clone(),
            graph: summary.clone(),
            optimized_ops,
            folder: self.folder.clone(),
            images: both.len(),
            agreement,
            float32: fs,
            int8: is,
            checks,
            passed,
            failed_attempts: vec![],
            ood: None,
        }))
    }
}
