//! `trainer`: fine-tunes Xception on an image folder.
//!
//!   trainer train [--config run.toml] [--data DIR] [--out DIR] [flags]
//!
//! Flags override the config file, which overrides the defaults (see `trainer::config`).

use anyhow::Context;
use candle_core::Device;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use trainer::config::{ComputePrecision, OptimizerKind, Schedule, TrainConfig};

#[global_allocator]
static GLOBAL: models::alloc::Allocator = models::alloc::Allocator;

#[derive(Parser, Debug)]
#[command(version, about = "Fine-tune an ImageNet Xception on a folder of photos")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train, evaluate on the test split, and write the run directory.
    Train(TrainArgs),
    /// Train every combination of a grid (reusing the feature caches), ranked by validation
    /// accuracy; phase 2 is skipped unless --fine-tune-epochs is given.
    Sweep(SweepArgs),
    /// Print the default configuration as TOML.
    DefaultConfig,
}

#[derive(clap::Args, Debug)]
struct SweepArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// Learning rates of the head (phase 2 keeps its ratio), comma-separated.
    #[arg(long, value_delimiter = ',')]
    lrs: Vec<f64>,
    #[arg(long, value_delimiter = ',')]
    batch_sizes: Vec<usize>,
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<u64>,
    #[arg(long, value_delimiter = ',')]
    dropouts: Vec<f64>,
    #[arg(long, value_delimiter = ',')]
    inners: Vec<usize>,
    #[arg(long, value_delimiter = ',')]
    image_sizes: Vec<usize>,
}

#[derive(clap::Args, Debug, Clone)]
struct TrainArgs {
    /// TOML configuration file (fields left out keep their defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Image folder with train/, validation/, test/.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model directory of the ImageNet base.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Run directory to write.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Square input size in pixels (>= 71).
    #[arg(long)]
    image_size: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Width of the head's hidden layer.
    #[arg(long)]
    inner: Option<usize>,
    #[arg(long)]
    dropout: Option<f64>,
    /// First block fine-tuned in phase 2 (13: the exit flow; --fine-tune-epochs 0 turns phase 2 off).
    #[arg(long)]
    fine_tune_from: Option<usize>,
    /// Cached variants of each training image (original + augmented).
    #[arg(long)]
    variants: Option<usize>,
    /// Turn augmentation off.
    #[arg(long)]
    no_augment: bool,
    /// Maximum epochs of phase 1 (head).
    #[arg(long)]
    head_epochs: Option<usize>,
    /// Learning rate of phase 1.
    #[arg(long)]
    head_lr: Option<f64>,
    /// Maximum epochs of phase 2 (fine-tuning; 0 skips it).
    #[arg(long)]
    fine_tune_epochs: Option<usize>,
    /// Learning rate of phase 2.
    #[arg(long)]
    fine_tune_lr: Option<f64>,
    /// Label smoothing of the training loss.
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Per-step moving average of the weights in phase 2 (0: off, e.g. 0.998).
    #[arg(long)]
    fine_tune_ema: Option<f64>,
    /// Optimiser of both phases.
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerKind>,
    /// Learning-rate schedule of both phases.
    #[arg(long, value_enum)]
    schedule: Option<Schedule>,
    /// Early-stopping patience of both phases (epochs; 0: never stop early).
    #[arg(long)]
    patience: Option<usize>,
    /// Fail on an unreadable image instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Continue a killed run from its checkpoint in the run directory.
    #[arg(long)]
    resume: bool,
    /// `cpu`, or `cuda` (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Float type of the network: `f32`, or `bf16` mixed precision (for `--device cuda`).
    #[arg(long, value_enum)]
    precision: Option<ComputePrecision>,
}

fn config(a: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut c = match &a.config {
        Some(p) => TrainConfig::from_file(p)?,
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($($field:ident).+ = $v:expr) => {
            if let Some(v) = $v.clone() {
                c.$($field).+ = v;
            }
        };
    }
    set!(data = a.data);
    set!(base = a.base);
    set!(out = a.out);
    set!(image_size = a.image_size);
    set!(batch_size = a.batch_size);
    set!(precision = a.precision);
    set!(seed = a.seed);
    set!(inner = a.inner);
    set!(dropout = a.dropout);
    set!(fine_tune_from = a.fine_tune_from);
    set!(variants = a.variants);
    set!(head.epochs = a.head_epochs);
    set!(head.lr = a.head_lr);
    set!(fine_tune.epochs = a.fine_tune_epochs);
    set!(fine_tune.lr = a.fine_tune_lr);
    set!(fine_tune.ema = a.fine_tune_ema);
    set!(label_smoothing = a.label_smoothing);
    for p in [&mut c.head, &mut c.fine_tune] {
        if let Some(o) = a.optimizer {
            p.optimizer = o;
        }
        if let Some(s) = a.schedule {
            p.schedule = s;
        }
        if let Some(n) = a.patience {
            p.patience = n;
        }
    }
    if a.no_augment {
        c.augment.enabled = false;
    }
    c.strict |= a.strict;
    c.validate()?;
    Ok(c)
}

fn device(name: &str, precision: ComputePrecision) -> anyhow::Result<Device> {
    if precision == ComputePrecision::Bf16 && name == "cpu" {
        tracing::warn!(
            "bf16 on the CPU runs Candle's generic ops, several times slower than f32: it is meant for --device cuda"
        );
    }
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            Device::new_cuda(0).context("--device cuda: no usable CUDA GPU (or this build lacks the `cuda` feature)")
        }
        other => anyhow::bail!("--device {other}: expected `cpu` or `cuda`"),
    }
}

fn main() -> anyhow::Result<()> {
    models::alloc::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_target(false)
        .init();
    match Cli::parse().cmd {
        Cmd::DefaultConfig => print!("{}", TrainConfig::default().to_toml()),
        Cmd::Sweep(a) => {
            let mut cfg = config(&a.train)?;
            if a.train.fine_tune_epochs.is_none() {
                cfg.fine_tune.epochs = 0;
            }
            let dev = device(&a.train.device, cfg.precision)?;
            let grid = trainer::sweep::Grid {
                lr: a.lrs,
                batch_size: a.batch_sizes,
                seed: a.seeds,
                dropout: a.dropouts,
                inner: a.inners,
                image_size: a.image_sizes,
            };
            let out = cfg.out.clone();
            let rows = trainer::sweep::sweep(&cfg, &grid, &out, &dev)?;
            print!("{}", std::fs::read_to_string(out.join("sweep.md"))?);
            if let Some(b) = rows.first() {
                println!(
                    "best: {} (validation accuracy {:.4}), weights in {}",
                    b.run,
                    b.val_accuracy,
                    out.join("runs").join(&b.run).display()
                );
            }
        }
        Cmd::Train(a) => {
            let cfg = config(&a)?;
            let dev = device(&a.device, cfg.precision)?;
            let o = trainer::train::run(&cfg, a.resume, &dev)?;
            println!("\nvalidation:\n{}", o.validation.table());
            println!("test:\n{}", o.test.table());
            println!("run directory: {} ({:.0} s)", o.run_dir.display(), o.seconds);
        }
    }
    Ok(())
}
