//! `trainer`: fine-tunes Xception on an image folder.
//!
//!   trainer train [--config run.toml] [--data DIR] [--out DIR] [flags]
//!
//! Flags override the config file, which overrides the defaults (see `trainer::config`).

use anyhow::Context;
use candle_core::Device;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use trainer::config::{Auto, CacheEngine, ClassWeights, ComputePrecision, OptimizerKind, Refit, Schedule, TrainConfig};

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
    /// Metrics and confusion matrix of a trained run on labelled folders (FOLDER/<class>/...).
    Eval(EvalArgs),
    /// Average the weights of runs fine-tuned from one start (members of one seed) into one
    /// run directory, a "model soup".
    Soup {
        /// The run directories.
        #[arg(required = true, num_args = 2..)]
        runs: Vec<PathBuf>,
        /// The run directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Fit (again) the out-of-distribution score of a finished run (`ood.safetensors`, which the
    /// exporter builds into the ONNX file as `ood_score`) from its feature caches.
    Ood(OodArgs),
    /// Print the default configuration as TOML.
    DefaultConfig,
}

#[derive(clap::Args, Debug)]
struct OodArgs {
    /// The run directory (its config.toml says the data and caches).
    run_dir: PathBuf,
    /// Also write the pooled features and logits of the three splits (and of FOLDERS) here, as
    /// raw float32 files (for comparing scores: scripts/experiments/ood-scores.py).
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Further folders of images (any layout) whose features go to --dump.
    folders: Vec<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// The run directory (model.json + model.safetensors).
    run_dir: PathBuf,
    /// Another run to average with (repeatable): the prediction is the mean of the runs'
    /// probabilities, an ensemble.
    #[arg(long = "with", value_name = "RUN_DIR")]
    with: Vec<PathBuf>,
    /// Labelled folders, one sub-folder per class.
    #[arg(required_unless_present = "split")]
    folders: Vec<PathBuf>,
    /// A split of the run itself, as recorded in its splits.csv (e.g. `test` when it was carved
    /// from a folder of class folders).
    #[arg(long, value_parser = clap::value_parser!(modelspec::splits::Split))]
    split: Option<modelspec::splits::Split>,
    /// Only the files whose name matches this regular expression, e.g. the later photos of
    /// footwear-15k: '_(200[1-9]|20[1-9][0-9]|2[1-9][0-9]{2}|[3-9][0-9]{3})\.jpg$'
    #[arg(long)]
    only: Option<regex::Regex>,
    /// What runs the network (auto: ONNX Runtime if found, else Candle).
    #[arg(long, value_enum, default_value = "auto")]
    engine: CacheEngine,
    /// ONNX Runtime library (else $ORT_DYLIB_PATH or .local/onnxruntime/).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Also write the reports (metrics, confusion matrices, misclassified files) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// List every misclassified file, and draw the most confident ones on a contact sheet
    /// (`--errors-sheet`).
    #[arg(long)]
    errors: bool,
    /// Where the contact sheet of `--errors` goes (default: RUN_DIR/errors_<folder>.png).
    #[arg(long)]
    errors_sheet: Option<PathBuf>,
    /// Test-time flip averaging: each photo's probabilities averaged with its mirror image's.
    #[arg(long)]
    flip: bool,
    /// Test-time resolution: photos resized to this side instead of the run's training size
    /// (the network is fully convolutional up to its global pooling).
    #[arg(long)]
    image_size: Option<usize>,
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
    /// Image folder: train/ with validation/ (or val/, valid/) and an optional test/; train/
    /// alone; or class folders alone (missing splits are carved from the photos there are).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Share of each class carved out for validation when the folder has no validation split.
    #[arg(long)]
    validation_fraction: Option<f64>,
    /// Share of each class carved out for test when the folder has no validation split (0: none).
    #[arg(long)]
    test_fraction: Option<f64>,
    /// The model's name (in the run, the ONNX file and the server's URLs; default: the data
    /// folder's name).
    #[arg(long)]
    name: Option<String>,
    /// How a photo is fitted to the square input: `stretch` (the whole photo) or `crop` (its
    /// centre square); the exported file and the runtime do the same.
    #[arg(long, value_parser = clap::value_parser!(modelspec::Fit))]
    resize: Option<modelspec::Fit>,
    /// Class-weighted loss, the best epoch chosen on macro-F1 (auto: when classes differ more than 2:1).
    #[arg(long, value_enum)]
    class_weights: Option<ClassWeights>,
    /// Model directory of the ImageNet base.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Run directory to write.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Square input size in pixels (>= 71; auto: 299 for photos of 299 px and more in sets of up
    /// to 20,000, else 224).
    #[arg(long)]
    image_size: Option<Auto<usize>>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Member of an ensemble (0: the plain run): changes phase 2's data order, dropout and first
    /// cached variant, not the caches or phase 1.
    #[arg(long)]
    member: Option<u64>,
    /// Width of the head's hidden layer.
    #[arg(long)]
    inner: Option<usize>,
    #[arg(long)]
    dropout: Option<f64>,
    /// First block fine-tuned in phase 2 (13: the exit flow; --fine-tune-epochs 0 turns phase 2 off).
    #[arg(long)]
    fine_tune_from: Option<usize>,
    /// Cached variants of each training image (original + augmented; auto: from the photos).
    #[arg(long)]
    variants: Option<Auto<usize>>,
    /// Turn augmentation off.
    #[arg(long)]
    no_augment: bool,
    /// Maximum epochs of phase 1 (head; auto: from the optimiser steps an epoch).
    #[arg(long)]
    head_epochs: Option<Auto<usize>>,
    /// Learning rate of phase 1.
    #[arg(long)]
    head_lr: Option<f64>,
    /// Maximum epochs of phase 2 (fine-tuning; 0 skips it; auto: from the steps an epoch).
    #[arg(long)]
    fine_tune_epochs: Option<Auto<usize>>,
    /// Learning rate of phase 2.
    #[arg(long)]
    fine_tune_lr: Option<f64>,
    /// Label smoothing of the training loss.
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Per-step moving average of the weights in phase 2 (0: off, e.g. 0.998; auto: from the
    /// phase's steps).
    #[arg(long)]
    fine_tune_ema: Option<Auto<f64>>,
    /// Mixup of the cached block maps in phase 2: the Beta(a, a) parameter (0: off, e.g. 0.2).
    #[arg(long)]
    fine_tune_mixup: Option<f64>,
    /// Optimiser of both phases.
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerKind>,
    /// Learning-rate schedule of both phases.
    #[arg(long, value_enum)]
    schedule: Option<Schedule>,
    /// Early-stopping patience of both phases (epochs; 0: never stop early; auto: from the epochs).
    #[arg(long)]
    patience: Option<Auto<usize>>,
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
    /// What runs the frozen blocks for the feature caches (auto: ONNX Runtime if found).
    #[arg(long, value_enum)]
    cache_engine: Option<CacheEngine>,
    /// ONNX Runtime library for the cache engine (else $ORT_DYLIB_PATH or .local/onnxruntime/).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Folder of the feature caches on disk ("" keeps them in memory).
    #[arg(long)]
    feature_cache: Option<PathBuf>,
    /// Do not evaluate on the test split (while choosing a recipe on validation).
    #[arg(long)]
    skip_test: bool,
    /// Train on the validation photos too, once the recipe is chosen (each phase then runs all
    /// its epochs and keeps the last weights): `half` holds out every other photo to measure it.
    #[arg(long, value_enum)]
    refit: Option<Refit>,
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
    set!(validation_fraction = a.validation_fraction);
    set!(test_fraction = a.test_fraction);
    set!(name = a.name);
    set!(resize = a.resize);
    set!(class_weights = a.class_weights);
    set!(base = a.base);
    set!(out = a.out);
    set!(image_size = a.image_size);
    set!(batch_size = a.batch_size);
    set!(precision = a.precision);
    set!(seed = a.seed);
    set!(member = a.member);
    set!(inner = a.inner);
    set!(dropout = a.dropout);
    set!(fine_tune_from = a.fine_tune_from);
    set!(variants = a.variants);
    set!(head.epochs = a.head_epochs);
    set!(head.lr = a.head_lr);
    set!(fine_tune.epochs = a.fine_tune_epochs);
    set!(fine_tune.lr = a.fine_tune_lr);
    set!(fine_tune.ema = a.fine_tune_ema);
    set!(fine_tune.mixup = a.fine_tune_mixup);
    set!(label_smoothing = a.label_smoothing);
    set!(cache_engine = a.cache_engine);
    set!(feature_cache = a.feature_cache);
    set!(refit = a.refit);
    if a.ort_lib.is_some() {
        c.ort_lib = a.ort_lib.clone();
    }
    if a.skip_test {
        c.evaluate_test = false;
    }
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

/// A file-name part for a folder's contact sheet: its last two components (`test_boot`).
fn sheet_name(folder: &std::path::Path) -> String {
    let parts: Vec<String> = folder
        .components()
        .rev()
        .take(2)
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .chars()
                .map(|c| if c.is_alphanumeric() || c == '-' { c } else { '_' })
                .collect()
        })
        .collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("_")
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
        // The log on stderr, results on stdout; colours only for a terminal (a log file gets
        // plain text).
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match Cli::parse().cmd {
        Cmd::Eval(a) => {
            let o_run = a.run_dir.clone();
            let o = trainer::eval::EvalOptions {
                run_dir: a.run_dir,
                with: a.with,
                folders: a.folders,
                split: a.split,
                only: a.only,
                engine: a.engine,
                ort_lib: a.ort_lib,
                batch: a.batch,
                flip: a.flip,
                image_size: a.image_size,
            };
            let reports = trainer::eval::evaluate(&o)?;
            for r in &reports {
                let mut only = r.only.as_ref().map(|p| format!(", files matching `{p}`")).unwrap_or_default();
                if r.flip {
                    only += ", flip-averaged";
                }
                if a.image_size.is_some() {
                    only += &format!(", at {} px", r.image_size);
                }
                if r.runs.len() > 1 {
                    only += &format!(", ensemble of {} runs", r.runs.len());
                }
                println!("{}{only} ({}):\n{}", r.folder.display(), r.engine, r.report.table());
                for u in &r.unreadable {
                    println!("unreadable, skipped: {u}");
                }
                if a.errors {
                    for m in &r.errors {
                        println!(
                            "wrong: {} ({}, predicted {} at {:.1}%)",
                            m.path.display(),
                            m.truth,
                            m.predicted,
                            100.0 * m.confidence
                        );
                    }
                    let sheet = match (&a.errors_sheet, reports.len()) {
                        (Some(p), 1) => p.clone(),
                        (Some(p), _) => p.with_file_name(format!(
                            "{}_{}.png",
                            p.file_stem().unwrap_or_default().to_string_lossy(),
                            sheet_name(&r.folder)
                        )),
                        (None, _) => match r.split {
                            Some(split) => o_run.join(format!("errors_eval_{split}.png")),
                            None => o_run.join(format!("errors_{}.png", sheet_name(&r.folder))),
                        },
                    };
                    let title = r.folder.display().to_string();
                    if trainer::report::contact_sheet(&r.errors, &title, &sheet)? {
                        println!("contact sheet of the errors: {}", sheet.display());
                    }
                }
                if r.trained_on > 0 {
                    println!(
                        "note: {} of these photos are training photos of the run (its splits.csv): these figures are \
                         not figures on new photos",
                        r.trained_on
                    );
                }
            }
            if let Some(p) = &a.json {
                std::fs::write(p, serde_json::to_string_pretty(&reports)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
        }
        Cmd::Soup { runs, out } => {
            trainer::soup::soup(&runs, &out)?;
            println!("{}: the mean of {} runs' weights", out.display(), runs.len());
        }
        Cmd::Ood(a) => {
            let path = a.run_dir.join("config.toml");
            let mut cfg = TrainConfig::from_file(&path)?;
            cfg.out = a.run_dir.clone();
            let dev = device(&a.device, cfg.precision)?;
            let p = trainer::train::prepare(&cfg, &dev)?;
            let from = cfg.fine_tunes().then_some(cfg.fine_tune_from);
            let f = trainer::ood::fit_run(&a.run_dir, &p, from, &dev)?;
            println!(
                "{}: {} fitted on {:?} training photos (shrinkage {:.3})",
                a.run_dir.join(models::ood::OOD_FILE).display(),
                f.fit.method,
                f.fit.photos,
                f.fit.shrinkage
            );
            if let Some(dir) = &a.dump {
                let desc = modelspec::ModelDescription::load(&a.run_dir.join(modelspec::DESCRIPTION_FILE))?;
                for (i, name) in ["train", "validation", "test"].iter().enumerate() {
                    let c = &p.caches[i];
                    let labels: Vec<String> = c.labels[..c.n].iter().map(|&l| p.classes[l as usize].clone()).collect();
                    trainer::ood::dump(dir, name, &f.net, &f.features[i], &labels, &p.paths[i], &dev)?;
                }
                for folder in &a.folders {
                    let (feats, paths) = trainer::ood::folder_features(&f.net, &desc, folder, &dev)?;
                    let name = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or("folder".into());
                    let labels: Vec<String> = paths
                        .iter()
                        .map(|p| {
                            p.parent()
                                .and_then(|d| d.file_name())
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default()
                        })
                        .collect();
                    trainer::ood::dump(dir, &name, &f.net, &feats, &labels, &paths, &dev)?;
                }
                println!("features and logits in {}", dir.display());
            }
        }
        Cmd::DefaultConfig => print!("{}", TrainConfig::default().to_toml()),
        Cmd::Sweep(a) => {
            let mut cfg = config(&a.train)?;
            if a.train.fine_tune_epochs.is_none() {
                cfg.fine_tune.epochs = Auto::Set(0);
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
            match &o.test {
                Some(t) => println!("test:\n{}", t.table()),
                None if o.has_test_split => println!("test: not evaluated (--skip-test)"),
                None => println!(
                    "test: none (the folder has no test split): the validation figure above is the final one, and \
                     validation also chose the epochs"
                ),
            }
            println!("report: {}", o.run_dir.join("report.html").display());
            println!("run directory: {} ({:.0} s)", o.run_dir.display(), o.seconds);
        }
    }
    Ok(())
}
