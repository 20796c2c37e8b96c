//! The training configuration: one serde struct with defaults, readable from a TOML file and
//! overridden by command-line flags. The defaults are the best recipe measured on the footwear
//! photos, chosen on the validation split (docs/training.md): on footwear-15k, 99.22% test
//! accuracy and macro-F1 at 224 px (98.89% on its later photos), in 40 minutes from scratch on 2
//! Zen 5 EPYC cores (the target is 60).
//!
//! The settings that depend on how many photos there are (epochs, patience, warm-up, the weight
//! average, cached variants, class weights) are `auto` by default: [`TrainConfig::resolve`]
//! derives them from the number of training photos and optimiser steps ([`DataSize`]), so that
//! they give footwear-15k's tuned constants on footwear-15k and scale with the steps elsewhere
//! (20 photos a class to 100,000). The run's `config.toml` holds the values chosen.

use crate::augment::AugmentConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A setting given as a value or left to [`TrainConfig::resolve`] (`"auto"` in TOML and on the
/// command line).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Auto<T> {
    Auto,
    Set(T),
}

impl<T: Copy> Auto<T> {
    /// The value; a configuration is resolved before any of its `auto` settings is read.
    pub fn get(self) -> T {
        match self {
            Auto::Set(v) => v,
            Auto::Auto => panic!("an `auto` setting was read before TrainConfig::resolve"),
        }
    }

    /// The value, or `f()` when `auto`.
    fn or_else(self, f: impl FnOnce() -> T) -> Self {
        Auto::Set(match self {
            Auto::Set(v) => v,
            Auto::Auto => f(),
        })
    }
}

impl<T> From<T> for Auto<T> {
    fn from(v: T) -> Self {
        Auto::Set(v)
    }
}

impl<T: Serialize> Serialize for Auto<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Auto::Auto => s.serialize_str("auto"),
            Auto::Set(v) => v.serialize(s),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Auto<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either<T> {
            Word(String),
            Value(T),
        }
        match Either::<T>::deserialize(d)? {
            Either::Value(v) => Ok(Auto::Set(v)),
            Either::Word(w) if w == "auto" => Ok(Auto::Auto),
            Either::Word(w) => Err(serde::de::Error::custom(format!("`{w}`: expected a number or \"auto\""))),
        }
    }
}

impl<T: std::str::FromStr> std::str::FromStr for Auto<T>
where
    T::Err: std::fmt::Display,
{
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Auto::Auto);
        }
        s.parse().map(Auto::Set).map_err(|e| format!("`{s}`: {e} (or `auto`)"))
    }
}

impl<T: std::fmt::Display> std::fmt::Display for Auto<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auto::Auto => f.write_str("auto"),
            Auto::Set(v) => v.fmt(f),
        }
    }
}

/// Whether the loss weighs each class by the inverse of its share of the training photos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClassWeights {
    /// On when the largest class has more than [`IMBALANCE_RATIO`] times the photos of the
    /// smallest.
    #[default]
    Auto,
    /// Weighted ("balanced", as scikit-learn's and PyTorch's `weight=`), selection on macro-F1.
    On,
    /// Plain loss, selection on accuracy.
    Off,
}

/// Largest ratio of the biggest class to the smallest (training photos) that `auto` leaves
/// unweighted: footwear's classes are equal; a class with a third of another's photos is
/// learnt too little without weights.
pub const IMBALANCE_RATIO: f64 = 2.0;

/// What [`TrainConfig::resolve`] derives the `auto` settings from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSize {
    /// Training photos per class.
    pub per_class: Vec<usize>,
    /// Median shorter side of the training photos, pixels (from a sample of their headers;
    /// `None` when none could be read).
    pub short_side: Option<u32>,
}

/// Xception's own input size (keras.applications.Xception), used for photos that have the
/// detail for it; 224 otherwise (footwear's 136 x 102 photos have none to give, and 224 costs
/// 0.56 of 299's work per photo).
pub const NATIVE_SIZE: usize = 299;
/// The input size of photos smaller than [`NATIVE_SIZE`], and of large sets.
pub const SMALL_SIZE: usize = 224;
/// Most training photos given [`NATIVE_SIZE`] by `auto` (beyond, 299 px would add about 80%
/// to an already long run).
pub const NATIVE_SIZE_MAX_PHOTOS: usize = 20_000;

impl DataSize {
    pub fn photos(&self) -> usize {
        self.per_class.iter().sum()
    }

    /// Largest class over smallest.
    pub fn imbalance(&self) -> f64 {
        let max = self.per_class.iter().copied().max().unwrap_or(0) as f64;
        let min = self.per_class.iter().copied().min().unwrap_or(0).max(1) as f64;
        max / min
    }
}

/// The reference the `auto` rules are scaled from: footwear-15k, whose constants were tuned on
/// its validation split (docs/training.md): 9,600 training photos, batches of 32, so 300 steps an
/// epoch; phase 1 ran 30 epochs (9,000 steps), phase 2 6 (1,800 steps) with a weight average of
/// 0.998 (a horizon of 500 steps, 0.278 of the phase), 2 cached variants (19,200 items).
mod reference {
    pub const HEAD_STEPS: f64 = 9_000.0;
    pub const FINE_TUNE_STEPS: f64 = 1_800.0;
    /// Phase steps over the weight average's horizon (1 / (1 - decay)): 1,800 / 500.
    pub const EMA_SPAN: f64 = 3.6;
    pub const CACHED_ITEMS: f64 = 19_200.0;
}

/// Optimiser of a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    Sgd,
}

/// Learning-rate schedule of a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Constant rate.
    Constant,
    /// Linear warm-up, then cosine decay to zero at the last epoch.
    Cosine,
    /// Divide the rate by 10 after `patience` epochs without improvement of validation loss.
    ReduceOnPlateau,
}

/// Float type of the network's computation during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ComputePrecision {
    /// f32 everywhere (the CPU kernels).
    #[default]
    F32,
    /// Mixed precision for GPUs: the blocks compute in bf16, weights, optimiser and head stay
    /// f32. On the CPU it runs Candle's generic ops, several times slower than f32.
    Bf16,
}

impl ComputePrecision {
    /// The compute type of the Xception blocks.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputePrecision::F32 => candle_core::DType::F32,
            ComputePrecision::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// What runs the frozen blocks when the feature caches are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CacheEngine {
    /// ONNX Runtime when its library is found (and the run is f32 on the CPU), else Candle.
    #[default]
    Auto,
    /// The Candle network.
    Candle,
    /// ONNX Runtime; an error if its library is missing or its features disagree.
    Onnxruntime,
}

/// Whether the validation photos join the training set, once a recipe has been chosen on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Refit {
    /// Train on `train/` alone; validation picks each phase's best epoch and stops it early.
    #[default]
    Off,
    /// Every other validation photo of each class (the 1st, 3rd, ... in file-name order) joins
    /// training; the others stay out and are what validation reports: measures what refitting
    /// brings before trusting it.
    Half,
    /// Every validation photo joins training (the recipe's choices were made before): validation
    /// figures are then on photos trained on, and say nothing about new ones.
    All,
}

impl Refit {
    /// Whether validation chooses epochs (best-epoch selection and early stopping). With refit
    /// on, each phase runs all its epochs and keeps its last (averaged) weights.
    pub fn selects_epochs(self) -> bool {
        self == Refit::Off
    }
}

/// One training phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PhaseConfig {
    /// Maximum number of epochs (0 skips the phase; auto: see [`TrainConfig::resolve`]).
    pub epochs: Auto<usize>,
    pub lr: f64,
    pub optimizer: OptimizerKind,
    pub schedule: Schedule,
    /// Warm-up epochs of the cosine schedule.
    pub warmup_epochs: Auto<usize>,
    /// Early stopping: epochs without a better validation score before stopping (0: never).
    pub patience: Auto<usize>,
    /// Decoupled weight decay (AdamW) or L2 (SGD) on every trainable weight.
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Exponential moving average of the weights, per step (0: off; e.g. 0.998). Validation,
    /// early stopping and the saved model use the averaged weights.
    pub ema: Auto<f64>,
    /// Mixup on the phase's inputs (the cached pooled features in phase 1, the cached block maps
    /// in phase 2: "manifold mixup"): each batch is mixed with a shuffled copy of itself with a
    /// weight drawn from Beta(mixup, mixup), and the loss mixed alike (0: off; e.g. 0.2). The
    /// training accuracy logged is then against each item's own label, so it reads low.
    pub mixup: f64,
}

impl Default for PhaseConfig {
    fn default() -> Self {
        Self {
            epochs: Auto::Set(20),
            lr: 1e-3,
            optimizer: OptimizerKind::Adamw,
            schedule: Schedule::Cosine,
            warmup_epochs: Auto::Set(1),
            patience: Auto::Set(5),
            weight_decay: 0.0,
            momentum: 0.9,
            ema: Auto::Set(0.0),
            mixup: 0.0,
        }
    }
}

/// Everything a training run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Image folder: `train/` with `validation/` (or `val/`, `valid/`) and an optional `test/`,
    /// `train/` alone, or class folders alone; one sub-folder per class in each split. Splits it
    /// lacks are carved from the photos there are (`validation_fraction`, `test_fraction`).
    pub data: PathBuf,
    /// Share of each class carved out for validation when the folder has no validation split.
    pub validation_fraction: f64,
    /// Share of each class carved out for test when the folder has no validation split either
    /// (0: none; a folder with a validation split and no `test/` has no test split).
    pub test_fraction: f64,
    /// Model directory of the ImageNet Xception base (scripts/fetch-weights.sh).
    pub base: PathBuf,
    /// Where the run directory goes.
    pub out: PathBuf,
    /// Side of the square input, pixels (>= 71; auto: Xception's own 299 for photos whose
    /// shorter side is 299 px or more in a set of up to 20,000 photos, else 224).
    pub image_size: Auto<usize>,
    /// How a photo is fitted to the square: `stretch` (the whole photo, as Keras) or `crop` (its
    /// centre square, as torchvision's resize + centre crop). The runtime does the same.
    pub resize: modelspec::Fit,
    pub batch_size: usize,
    /// Float type of the blocks' computation (`bf16`: mixed precision, for `--device cuda`).
    pub precision: ComputePrecision,
    pub seed: u64,
    /// Which member of an ensemble this run is: phase 2's data order, dropout masks and first
    /// cached variant depend on it; the feature caches and phase 1 do not, so members of one
    /// seed share them (0: the plain run).
    pub member: u64,
    /// Width of the head's hidden layer.
    pub inner: usize,
    pub dropout: f64,
    /// L2 penalty on the head's kernels (added to the loss, as Keras' kernel_regularizer).
    pub l2: f64,
    /// Label smoothing of the training loss (0: plain cross-entropy).
    pub label_smoothing: f64,
    /// First block trained in phase 2 (13 = the exit flow, 14 = its last block); phase 2 is
    /// off when `fine_tune.epochs` is 0.
    pub fine_tune_from: usize,
    /// Variants of each training image in the feature cache: the original plus augmented ones
    /// (auto: about 19,200 cached items, 2 to 10 variants).
    pub variants: Auto<usize>,
    /// Class-weighted loss and selection on macro-F1 (auto: when the classes' sizes differ by
    /// more than 2:1).
    pub class_weights: ClassWeights,
    pub augment: AugmentConfig,
    /// Phase 1: base frozen, the head learns.
    pub head: PhaseConfig,
    /// Phase 2: blocks from `fine_tune_from` up, and the head, at a lower rate (0 epochs: no
    /// fine-tuning).
    pub fine_tune: PhaseConfig,
    /// Fail on an unreadable image instead of skipping it with a warning.
    pub strict: bool,
    /// The model's name, written into the description and the ONNX file (empty: the data
    /// folder's name).
    pub name: String,
    /// Folder for feature caches on disk (reused by later runs and by `--resume`); empty: memory only.
    pub feature_cache: PathBuf,
    /// What runs the frozen blocks for the feature caches.
    pub cache_engine: CacheEngine,
    /// ONNX Runtime's library for the cache engine (else $ORT_DYLIB_PATH or .local/onnxruntime/).
    pub ort_lib: Option<PathBuf>,
    /// Evaluate on the test split at the end (off while choosing a recipe: the test split is
    /// looked at once, for the final figure).
    pub evaluate_test: bool,
    /// Validation photos in the training set (see [`Refit`]).
    pub refit: Refit,
    /// Cosine similarity of the ImageNet features (pooled, frozen base) above which two photos
    /// of different splits are reported as near-identical (a leak); byte-identical files are
    /// reported whatever this is.
    pub near_duplicate: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            data: "../shared/data/footwear-15k".into(),
            validation_fraction: 0.15,
            test_fraction: 0.15,
            base: "weights/xception-imagenet".into(),
            out: "runs/footwear".into(),
            image_size: Auto::Auto,
            resize: modelspec::Fit::Stretch,
            batch_size: 32,
            precision: ComputePrecision::F32,
            seed: 42,
            member: 0,
            inner: 100,
            dropout: 0.2,
            l2: 1e-4,
            label_smoothing: 0.1,
            fine_tune_from: 12,
            variants: Auto::Auto,
            class_weights: ClassWeights::Auto,
            augment: AugmentConfig::default(),
            // On footwear-15k `auto` gives 30 epochs, patience 6, 1 warm-up epoch.
            head: PhaseConfig {
                epochs: Auto::Auto,
                lr: 1e-3,
                patience: Auto::Auto,
                warmup_epochs: Auto::Auto,
                ..PhaseConfig::default()
            },
            fine_tune: PhaseConfig {
                // Chosen on footwear-15k's validation split: 6 epochs 98.89%, 5 epochs 98.83%
                // (docs/training.md); `auto` gives 6 epochs, patience 3, 1 warm-up epoch and a
                // weight average of 0.998 there.
                epochs: Auto::Auto,
                lr: 1e-4,
                patience: Auto::Auto,
                warmup_epochs: Auto::Auto,
                weight_decay: 1e-4,
                ema: Auto::Auto,
                ..PhaseConfig::default()
            },
            strict: false,
            name: String::new(),
            feature_cache: "runs/feature-cache".into(),
            cache_engine: CacheEngine::Auto,
            ort_lib: None,
            evaluate_test: true,
            refit: Refit::Off,
            near_duplicate: 0.97,
        }
    }
}

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Toml { path: PathBuf, source: toml::de::Error },
    #[error("config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl TrainConfig {
    /// Reads a TOML file; fields it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Toml { path: path.into(), source })
    }

    /// Checks values that would otherwise fail deep inside training.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        let sizes = models::layers::MIN_INPUT_SIZE..=modelspec::MAX_INPUT_SIZE;
        match self.image_size {
            Auto::Set(size) if !sizes.contains(&size) => {
                return bad("image_size", format!("{size} px is not within {sizes:?} px"));
            }
            _ => {}
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be positive".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{} is not in [0, 1)", self.dropout));
        }
        let blocks = 2..=models::layers::NUM_BLOCKS;
        if !blocks.contains(&self.fine_tune_from) {
            return bad(
                "fine_tune_from",
                format!("block {} is not in {blocks:?} (fine_tune.epochs = 0 turns phase 2 off)", self.fine_tune_from),
            );
        }
        if self.variants == Auto::Set(0) {
            return bad("variants", "at least 1 (the original image)".into());
        }
        for (field, f) in [("validation_fraction", self.validation_fraction), ("test_fraction", self.test_fraction)] {
            if !(0.0..0.5).contains(&f) {
                return bad(field, format!("{f} is not in [0, 0.5)"));
            }
        }
        if self.validation_fraction == 0.0 {
            return bad("validation_fraction", "a carved validation split needs a share above 0".into());
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad("label_smoothing", format!("{} is not in [0, 1)", self.label_smoothing));
        }
        for (field, pc) in [("head.ema", &self.head), ("fine_tune.ema", &self.fine_tune)] {
            if let Auto::Set(e) = pc.ema {
                if !(0.0..1.0).contains(&e) {
                    return bad(field, format!("{e} is not in [0, 1)"));
                }
            }
        }
        for (field, pc) in [("head.mixup", &self.head), ("fine_tune.mixup", &self.fine_tune)] {
            if !(pc.mixup >= 0.0 && pc.mixup.is_finite()) {
                return bad(field, format!("{} is not a Beta parameter >= 0 (0: off)", pc.mixup));
            }
        }
        if self.inner == 0 {
            return bad("inner", "must be positive".into());
        }
        for (field, pc) in [("head.schedule", &self.head), ("fine_tune.schedule", &self.fine_tune)] {
            if self.refit != Refit::Off && pc.schedule == Schedule::ReduceOnPlateau {
                return bad(
                    field,
                    "reduce-on-plateau follows the validation loss, which a refit trains on (use cosine or constant)"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The settings of a phase.
    pub fn phase(&self, phase: crate::checkpoint::Phase) -> &PhaseConfig {
        match phase {
            crate::checkpoint::Phase::Head => &self.head,
            crate::checkpoint::Phase::FineTune => &self.fine_tune,
        }
    }

    /// One line saying what a resolved configuration chose for `size`, for the log.
    pub fn describe_resolved(&self, size: &DataSize) -> String {
        let steps = size.photos().div_ceil(self.batch_size.max(1));
        let phase =
            |p: &PhaseConfig| format!("{} epochs (patience {}, warm-up {})", p.epochs, p.patience, p.warmup_epochs);
        let phase2 = if self.fine_tunes() {
            format!("{} with a weight average of {}", phase(&self.fine_tune), self.fine_tune.ema)
        } else {
            "off".into()
        };
        format!(
            "settings for {} training photos ({steps} steps an epoch; median shorter side {}): {} px; phase 1 {}, \
             phase 2 {phase2}; {} cached variants; class weights {} (largest class / smallest {:.2}); model name `{}`",
            size.photos(),
            size.short_side.map_or("unknown".into(), |s| format!("{s} px")),
            self.image_size,
            phase(&self.head),
            self.variants,
            match self.class_weights {
                ClassWeights::On => "on, epochs chosen on macro-F1",
                ClassWeights::Off => "off",
                ClassWeights::Auto => "auto",
            },
            size.imbalance(),
            self.name
        )
    }

    /// Whether phase 2 runs.
    pub fn fine_tunes(&self) -> bool {
        self.fine_tune.epochs != Auto::Set(0)
    }

    /// The model's name: `name`, else the data folder's name.
    pub fn model_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        let folder = std::fs::canonicalize(&self.data).unwrap_or_else(|_| self.data.clone());
        folder.file_name().map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty()).unwrap_or("model".into())
    }

    /// The configuration with every `auto` setting chosen for `size` (settings given stay):
    ///
    /// - phase 1: about 9,000 optimiser steps (10 to 300 epochs), patience a fifth of them (at
    ///   least 6), warm-up a thirtieth (at least 1);
    /// - phase 2: about 1,800 steps (2 to 40 epochs), patience half of them (at least 3), warm-up
    ///   a sixth (at least 1), and a weight average whose horizon is the phase's steps / 3.6;
    /// - cached variants: about 19,200 items (2 to 10 per photo);
    /// - input size: 299 px for photos whose median shorter side is at least that, in sets of up
    ///   to 20,000 photos, else 224;
    ///
    /// which on footwear-15k (9,600 photos, batches of 32) are its tuned constants exactly.
    pub fn resolve(&self, size: &DataSize) -> Self {
        let mut c = self.clone();
        c.image_size = c.image_size.or_else(|| match size.short_side {
            Some(s) if s as usize >= NATIVE_SIZE && size.photos() <= NATIVE_SIZE_MAX_PHOTOS => NATIVE_SIZE,
            _ => SMALL_SIZE,
        });
        let photos = size.photos().max(1) as f64;
        let steps = (photos / c.batch_size as f64).ceil().max(1.0);
        let epochs = |target: f64, lo: usize, hi: usize| ((target / steps).round() as usize).clamp(lo, hi);
        c.head.epochs = c.head.epochs.or_else(|| epochs(reference::HEAD_STEPS, 10, 300));
        let e1 = c.head.epochs.get();
        c.head.patience = c.head.patience.or_else(|| (e1 / 5).max(6));
        c.head.warmup_epochs = c.head.warmup_epochs.or_else(|| (e1 / 30).max(1));
        c.head.ema = c.head.ema.or_else(|| 0.0);
        c.fine_tune.epochs = c.fine_tune.epochs.or_else(|| epochs(reference::FINE_TUNE_STEPS, 2, 40));
        let e2 = c.fine_tune.epochs.get();
        c.fine_tune.patience = c.fine_tune.patience.or_else(|| e2.div_ceil(2).max(3));
        c.fine_tune.warmup_epochs = c.fine_tune.warmup_epochs.or_else(|| ((e2 as f64 / 6.0).round() as usize).max(1));
        c.fine_tune.ema = c.fine_tune.ema.or_else(|| {
            let decay = 1.0 - reference::EMA_SPAN / (e2.max(1) as f64 * steps);
            // Four decimals: footwear-15k's 0.998 exactly, and a readable config.
            ((decay * 1e4).round() / 1e4).clamp(0.0, 0.9999)
        });
        c.variants = c.variants.or_else(|| ((reference::CACHED_ITEMS / photos).round() as usize).clamp(2, 10));
        if c.name.is_empty() {
            c.name = c.model_name();
        }
        c.class_weights = match c.class_weights {
            ClassWeights::Auto if size.imbalance() > IMBALANCE_RATIO => ClassWeights::On,
            ClassWeights::Auto => ClassWeights::Off,
            w => w,
        };
        c
    }

    /// The configuration as TOML, as saved in the run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a config always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refit_refuses_a_schedule_that_follows_validation() {
        let mut c = TrainConfig { refit: Refit::All, ..Default::default() };
        c.validate().unwrap();
        c.fine_tune.schedule = Schedule::ReduceOnPlateau;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("fine_tune.schedule") && e.contains("refit"), "{e}");
        c.refit = Refit::Off;
        c.validate().unwrap();
    }

    #[test]
    fn carved_shares_are_checked() {
        for (v, t, field) in
            [(0.7, 0.15, "validation_fraction"), (0.0, 0.15, "validation_fraction"), (0.15, 0.5, "test_fraction")]
        {
            let c = TrainConfig { validation_fraction: v, test_fraction: t, ..Default::default() };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        TrainConfig { test_fraction: 0.0, ..Default::default() }.validate().unwrap();
    }

    /// On footwear-15k the `auto` settings are the constants tuned there (so its runs are the
    /// same to the byte as before they were derived); on a small set they follow the steps.
    #[test]
    fn auto_settings_give_the_tuned_constants_on_footwear_and_scale_elsewhere() {
        let c = TrainConfig::default().resolve(&DataSize { per_class: vec![3200; 3], short_side: Some(102) });
        let phase = |p: &PhaseConfig| (p.epochs.get(), p.patience.get(), p.warmup_epochs.get(), p.ema.get());
        assert_eq!(phase(&c.head), (30, 6, 1, 0.0));
        assert_eq!(phase(&c.fine_tune), (6, 3, 1, 0.998));
        assert_eq!((c.variants.get(), c.class_weights), (2, ClassWeights::Off));
        // The PyTorch tutorial's ants and bees: 244 photos, 8 steps an epoch.
        let s = TrainConfig::default().resolve(&DataSize { per_class: vec![123, 121], short_side: Some(375) });
        assert_eq!(
            (c.image_size.get(), s.image_size.get()),
            (224, 299),
            "footwear's 102 px photos, the tutorial's 375"
        );
        assert_eq!(phase(&s.head), (300, 60, 10, 0.0));
        assert_eq!(phase(&s.fine_tune), (40, 20, 7, 0.9888));
        assert_eq!(s.variants.get(), 10);
        // 100,000 photos: fewer epochs, the fewest variants.
        let l = TrainConfig::default().resolve(&DataSize { per_class: vec![50_000; 2], short_side: Some(1000) });
        assert_eq!(l.image_size.get(), 224, "100,000 large photos: the cheaper size");
        assert_eq!((l.head.epochs.get(), l.fine_tune.epochs.get(), l.variants.get()), (10, 2, 2));
        assert!(l.fine_tune.ema.get() > 0.999);
        // A class with a third of another's photos is weighted; given settings stay.
        let mut given = TrainConfig::default();
        given.fine_tune.epochs = 4.into();
        given.variants = 3.into();
        let w = given.resolve(&DataSize { per_class: vec![3200, 3200, 320], short_side: Some(102) });
        assert_eq!((w.fine_tune.epochs.get(), w.variants.get(), w.class_weights), (4, 3, ClassWeights::On));
        given.class_weights = ClassWeights::Off;
        assert_eq!(
            given.resolve(&DataSize { per_class: vec![3200, 320], short_side: Some(102) }).class_weights,
            ClassWeights::Off
        );
        // Resolving twice changes nothing; the TOML of a resolved config has no `auto` left.
        assert_eq!(w.resolve(&DataSize { per_class: vec![10, 10], short_side: Some(102) }), w);
        let text = w.to_toml();
        for field in ["variants", "epochs", "patience", "warmup_epochs", "ema", "class_weights"] {
            assert!(!text.contains(&format!("{field} = \"auto\"")), "{text}");
        }
        let back: TrainConfig = toml::from_str(&w.to_toml()).unwrap();
        assert_eq!(back, w);
    }

    #[test]
    fn auto_reads_and_writes_as_a_word() {
        let d = TrainConfig::default();
        let text = d.to_toml();
        assert!(text.contains("variants = \"auto\""), "{text}");
        let back: TrainConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, d);
        let e = toml::from_str::<TrainConfig>("variants = \"many\"").unwrap_err().to_string();
        assert!(e.contains("many") && e.contains("auto"), "{e}");
        assert_eq!("auto".parse::<Auto<usize>>(), Ok(Auto::Auto));
        assert_eq!("7".parse::<Auto<usize>>(), Ok(Auto::Set(7)));
        assert!("x".parse::<Auto<f64>>().unwrap_err().contains("auto"));
    }
}
