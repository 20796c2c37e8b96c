//! `exporter RUN_DIR`: writes RUN_DIR/model.onnx, verified against the Candle model.

use anyhow::Context;
use clap::Parser;
use exporter::graph::OnnxPrecision;
use exporter::{export, triton, ExportOptions};
use inference::evaluate::evaluate;
use std::path::PathBuf;

#[derive(Parser)]
#[command(version, about = "Export a trained (or Keras-imported) model directory to one self-describing ONNX file")]
struct Args {
    /// Model directory: model.json + model.safetensors (a trainer run, or `keras-import` output).
    run_dir: PathBuf,
    /// Output file [default: RUN_DIR/model.onnx; RUN_DIR/model.int8.onnx for int8].
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Weight and activation precision (f16: for the CUDA execution provider; int8: quantized
    /// for CPUs, calibrated and verified on photos).
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
    /// int8: photos to calibrate on (files, or folders of class folders) [default: the run's
    /// training split].
    #[arg(long, num_args = 1..)]
    calibration_photos: Vec<PathBuf>,
    /// int8: how many calibration photos, the same number per class.
    #[arg(long, default_value_t = 300)]
    calibration_count: usize,
    /// int8: seed of the choice of calibration photos.
    #[arg(long, default_value_t = 0)]
    calibration_seed: u64,
    /// int8: how activation ranges are taken from the calibration (if its file fails the
    /// verification, the other method is tried once: see --no-calibration-fallback).
    #[arg(long, value_enum, default_value = "minmax")]
    calibration_method: exporter::calibrate::Method,
    /// int8: when the file fails its verification, stop there instead of trying once more with
    /// the other calibration method.
    #[arg(long)]
    no_calibration_fallback: bool,
    /// int8: the percentile of `--calibration-method percentile`.
    #[arg(long, default_value_t = 99.99)]
    percentile: f64,
    /// int8: layers that keep float weights, comma-separated (e.g. block1_conv1,head_logits).
    #[arg(long, value_delimiter = ',')]
    keep_float: Vec<String>,
    /// int8: bits of the weights. 7 runs correctly on every x86 CPU; 8 only on CPUs with VNNI
    /// (AVX512-VNNI, AVX-VNNI): without it ONNX Runtime's integer kernels saturate, and the
    /// runtime refuses such a file there.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u8).range(7..=8))]
    weight_bits: u8,
    /// Test-time flip averaging built into the graph: every image runs with its mirror image and
    /// the outputs are averaged (twice the work; the runtime needs no change).
    #[arg(long)]
    flip_average: bool,
    /// The share of the run's validation photos whose out-of-distribution score the threshold
    /// rejects (the runtime answers `unknown` above it); set on in-distribution photos only.
    #[arg(long, default_value_t = exporter::ood::DEFAULT_REJECTION, conflicts_with = "no_ood")]
    ood_rejection: f64,
    /// No `ood_score` output, even when the run has the out-of-distribution fit.
    #[arg(long)]
    no_ood: bool,
    /// int8: labelled folder the file is verified on [default: the run's test split].
    #[arg(long)]
    verify_on: Option<PathBuf>,
    /// Graph input: uint8 resized pixels (scaled in the graph), or float32 already scaled
    /// (for tools that feed only float tensors).
    #[arg(long, value_enum, default_value = "uint8")]
    input_type: InputArg,
    /// Model version written into the metadata.
    #[arg(long, default_value_t = 1)]
    model_version: i64,
    /// Skip the verification against the Candle model.
    #[arg(long)]
    no_verify: bool,
    /// Sample images (files or folders) for the verification [default: the run's test split].
    #[arg(long, num_args = 1..)]
    samples: Vec<PathBuf>,
    /// Most sample images used.
    #[arg(long, default_value_t = 6)]
    max_samples: usize,
    /// Do not run the file through candle-onnx as well.
    #[arg(long)]
    no_candle_onnx: bool,
    /// Largest |logit difference| accepted [default: 1e-4 for f32, 5e-2 for f16].
    #[arg(long)]
    tolerance: Option<f32>,
    /// Accuracy of the written file through ONNX Runtime on a labelled folder (one sub-folder per class).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Also write a Triton Inference Server model repository here (<name>/config.pbtxt, <name>/1/model.onnx).
    #[arg(long)]
    triton: Option<PathBuf>,
    /// Triton's max_batch_size.
    #[arg(long, default_value_t = 32)]
    triton_max_batch: usize,
    /// ONNX Runtime library (else $ORT_DYLIB_PATH or .local/onnxruntime/).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PrecisionArg {
    F32,
    F16,
    Int8,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum InputArg {
    Uint8,
    Float32,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let a = Args::parse();
    let default_name = if a.precision == PrecisionArg::Int8 { "model.int8.onnx" } else { "model.onnx" };
    let out = a.out.clone().unwrap_or_else(|| a.run_dir.join(default_name));
    let ort = inference::SessionConfig { threads: a.threads, ort_lib: a.ort_lib.clone(), ..Default::default() };
    let o = ExportOptions {
        run_dir: a.run_dir.clone(),
        out,
        precision: if a.precision == PrecisionArg::F16 { OnnxPrecision::F16 } else { OnnxPrecision::F32 },
        input_type: match a.input_type {
            InputArg::Uint8 => modelspec::onnx_meta::InputType::Uint8,
            InputArg::Float32 => modelspec::onnx_meta::InputType::Float32,
        },
        model_version: a.model_version,
        verify: !a.no_verify,
        samples: a.samples.clone(),
        max_samples: a.max_samples,
        candle_onnx: !a.no_candle_onnx,
        tolerance: a.tolerance.unwrap_or(if a.precision == PrecisionArg::F16 { 5e-2 } else { 1e-4 }),
        ort: ort.clone(),
        flip_average: a.flip_average,
        ood_rejection: (!a.no_ood).then_some(a.ood_rejection),
    };
    let e = if a.precision == PrecisionArg::Int8 {
        let q = exporter::int8::Int8Options {
            calibration: exporter::calibrate::CalibrationOptions {
                photos: a.calibration_photos.clone(),
                count: a.calibration_count,
                seed: a.calibration_seed,
                method: a.calibration_method,
                percentile: a.percentile,
                ..Default::default()
            },
            keep_float: a.keep_float.clone(),
            weight_bits: a.weight_bits,
            verify_on: a.verify_on.clone(),
            fallback: !a.no_calibration_fallback,
            ..Default::default()
        };
        let (e, report) = exporter::int8::export_int8(&o, &q)?;
        if let Some(r) = &report {
            println!("{r}");
        }
        e
    } else {
        let e = export(&o)?;
        if let Some(r) = &e.report {
            println!("{r}");
        }
        e
    };
    println!("wrote {} ({:.1} MB)", e.path.display(), e.bytes as f64 / 1e6);
    match &e.ood {
        Some(m) => println!(
            "out of distribution: `ood_score` above {:.4} answers `unknown` ({:.2}% of {} validation photos, asked {:.2}%)",
            m.threshold,
            100.0 * m.rejected,
            m.photos,
            100.0 * m.rejection_rate
        ),
        None if !a.no_ood => println!("out of distribution: no `ood_score` output (the run has no ood.safetensors)"),
        None => {}
    }
    if let Some(p) = &e.report_path {
        println!("verification report: {}", p.display());
    }
    if let Some(dir) = &a.eval {
        let mut model = inference::OnnxModel::load(&e.path, &ort)?;
        let r = evaluate(&mut model, dir)?;
        println!("{r}");
        std::fs::write(e.path.with_extension("eval.json"), serde_json::to_string_pretty(&r)?)?;
    }
    if let Some(repo) = &a.triton {
        let desc = modelspec::ModelDescription::load(&a.run_dir).context("reading the model description")?;
        let d =
            triton::write(repo, &desc, &e.path, a.triton_max_batch, a.precision == PrecisionArg::F16, e.ood.is_some())?;
        println!("Triton model repository: {}", d.display());
    }
    Ok(())
}
