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
    /// Output file [default: RUN_DIR/model.onnx].
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Weight and activation precision (f16: for the CUDA execution provider).
    #[arg(long, value_enum, default_value = "f32")]
    precision: OnnxPrecision,
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
        .with_target(false)
        .init();
    let a = Args::parse();
    let out = a.out.clone().unwrap_or_else(|| a.run_dir.join("model.onnx"));
    let ort = inference::SessionConfig { threads: a.threads, ort_lib: a.ort_lib.clone(), ..Default::default() };
    let o = ExportOptions {
        run_dir: a.run_dir.clone(),
        out,
        precision: a.precision,
        input_type: match a.input_type {
            InputArg::Uint8 => modelspec::onnx_meta::InputType::Uint8,
            InputArg::Float32 => modelspec::onnx_meta::InputType::Float32,
        },
        model_version: a.model_version,
        verify: !a.no_verify,
        samples: a.samples.clone(),
        max_samples: a.max_samples,
        candle_onnx: !a.no_candle_onnx,
        tolerance: a.tolerance.unwrap_or(match a.precision {
            OnnxPrecision::F32 => 1e-4,
            OnnxPrecision::F16 => 5e-2,
        }),
        ort: ort.clone(),
    };
    let e = export(&o)?;
    if let Some(r) = &e.report {
        println!("{r}");
    }
    println!("wrote {} ({:.1} MB)", e.path.display(), e.bytes as f64 / 1e6);
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
        let d = triton::write(repo, &desc, &e.path, a.triton_max_batch, a.precision == OnnxPrecision::F16)?;
        println!("Triton model repository: {}", d.display());
    }
    Ok(())
}
