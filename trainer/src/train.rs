//! A training run, end to end: data → feature caches → phase 1 (head on the frozen base's
//! pooled features) → phase 2 (the top blocks and the head, on the cached output of the last
//! frozen block) → metrics on validation and test → the run directory.
//!
//! Every random draw comes from generators seeded by (seed, phase, epoch) or (seed, image,
//! variant), and every kernel sums in a fixed order, so the same seed gives the same metrics and
//! a resumed run ends where an uninterrupted one would have.

use crate::checkpoint::{Checkpoint, Phase, Section, TrainState};
use crate::config::{CacheEngine, ClassWeights, ComputePrecision, DataSize, PhaseConfig, Refit, Schedule, TrainConfig};
use crate::data::{self, Dataset, Images, SPLITS};
use crate::features::{self, CacheSpec, Engine, FeatureCache};
use crate::history::{self, Epoch};
use crate::metrics::{self, Report};
use crate::optim::Optimizer;
use crate::progress::Progress;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use models::head::{ClassifierHead, DENSE, LOGITS};
use models::layers::{FEATURES, NUM_BLOCKS};
use models::weights::{expected_tensors, write_model_files, ModelDir};
use models::xception::{global_avg_pool, Xception, XceptionOptions};
use modelspec::{Head, ModelDescription, Preprocessing, FORMAT_VERSION};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub run_dir: PathBuf,
    pub validation: Report,
    /// `None` when the configuration skips the test split, or the folder has none.
    pub test: Option<Report>,
    pub seconds: f64,
    /// Whether the folder has a test split (without one, validation's is the final figure).
    pub has_test_split: bool,
}

/// The block a tensor name belongs to (`block13_sepconv1.depthwise` → 13).
fn block_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("block")?;
    rest[..rest.find('_')?].parse().ok()
}

/// Glorot-uniform kernel (Keras' default) and zero bias for a Dense layer, from a seeded RNG.
fn dense_init(rng: &mut ChaCha8Rng, cin: usize, cout: usize, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let limit = (6.0 / (cin + cout) as f64).sqrt() as f32;
    let w: Vec<f32> = (0..cin * cout).map(|_| rng.random_range(-limit..limit)).collect();
    Ok((Tensor::from_vec(w, (cout, cin), dev)?, Tensor::zeros(cout, DType::F32, dev)?))
}

/// The rate of epoch `epoch` of a phase.
fn learning_rate(pc: &PhaseConfig, epoch: usize, factor: f64) -> f64 {
    match pc.schedule {
        Schedule::Constant => pc.lr,
        Schedule::ReduceOnPlateau => pc.lr * factor,
        Schedule::Cosine => {
            let (epochs, warmup) = (pc.epochs.get(), pc.warmup_epochs.get());
            let w = warmup.min(epochs.saturating_sub(1));
            if epoch < w {
                pc.lr * (epoch + 1) as f64 / (w + 1) as f64
            } else {
                let span = (epochs - w).max(1) as f64;
                pc.lr * 0.5 * (1.0 + (std::f64::consts::PI * (epoch - w) as f64 / span).cos())
            }
        }
    }
}

/// Mean loss, accuracy, predictions and (when asked for) class probabilities of a cache.
type Evaluation = (f64, f64, Vec<u32>, Vec<Vec<f32>>);

/// The network being trained: the base (blocks from `from` trainable), the head, their variables.
struct Trainable {
    base: Xception,
    head: ClassifierHead,
    from: usize,
    vars: HashMap<String, Var>,
}

impl Trainable {
    /// Logits of cached items: from pooled features (phase 1) or from cached maps (phase 2),
    /// the inputs mixed first when `mix` says so.
    fn logits(
        &self,
        phase: Phase,
        cache: &FeatureCache,
        items: &[usize],
        mask: Option<&Tensor>,
        mix: Option<&Mix>,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let f = if phase == Phase::Head {
            let p = cache.pooled_batch(items, dev)?;
            if let Some(m) = mix {
                m.inputs(&p)?
            } else {
                p
            }
        } else {
            let m = cache.maps_batch(items, dev)?;
            let m = if let Some(mx) = mix { mx.inputs(&m)? } else { m };
            global_avg_pool(&self.base.forward_blocks(&m, self.from, NUM_BLOCKS, &mut |_, _| {})?)?
        };
        self.head.forward_masked(&f, mask)
    }

    /// Mean loss, accuracy and predictions over every item of a cache (variant 0 only).
    fn evaluate(&self, phase: Phase, cache: &FeatureCache, dev: &Device) -> candle_core::Result<(f64, f64, Vec<u32>)> {
        let (loss, acc, preds, _) = self.evaluate_with_probabilities(phase, cache, false, dev)?;
        Ok((loss, acc, preds))
    }

    /// [`Self::evaluate`], and each item's class probabilities when `probabilities`.
    fn evaluate_with_probabilities(
        &self,
        phase: Phase,
        cache: &FeatureCache,
        probabilities: bool,
        dev: &Device,
    ) -> candle_core::Result<Evaluation> {
        let items: Vec<usize> = (0..cache.n).collect();
        let (mut loss, mut preds, mut probs) = (0f64, Vec::with_capacity(items.len()), Vec::new());
        for b in items.chunks(64) {
            let logits = self.logits(phase, cache, b, None, None, dev)?.detach();
            let labels = cache.labels_batch(b, dev)?;
            loss += candle_nn::loss::cross_entropy(&logits, &labels)?.to_scalar::<f32>()? as f64 * b.len() as f64;
            preds.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
            if probabilities {
                probs.extend(candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?);
            }
        }
        let correct = preds.iter().zip(&cache.labels).filter(|(p, t)| p == t).count();
        let n = items.len().max(1) as f64;
        Ok((loss / n, correct as f64 / n, preds, probs))
    }

    fn l2(&self) -> candle_core::Result<Tensor> {
        let w1 = self.vars[&format!("{DENSE}.weight")].as_tensor().sqr()?.sum_all()?;
        let w2 = self.vars[&format!("{LOGITS}.weight")].as_tensor().sqr()?.sum_all()?;
        w1 + w2
    }
}

/// Cross-entropy with label smoothing `eps`: the target puts 1 - eps on the label and spreads eps
/// over every class, as Keras' `label_smoothing`. With `weights` (one per class) each item's
/// loss counts by its class's weight, and the batch's loss is their weighted mean (as PyTorch's
/// `CrossEntropyLoss(weight=...)`).
fn smoothed_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    eps: f64,
    weights: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if eps == 0.0 && weights.is_none() {
        return candle_nn::loss::cross_entropy(logits, labels);
    }
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = logp.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let uniform = logp.mean(D::Minus1)?.neg()?;
    let per_item = ((nll * (1.0 - eps))? + (uniform * eps)?)?;
    match weights {
        None => per_item.mean_all(),
        Some(w) => {
            let w = w.index_select(labels, 0)?;
            (per_item * &w)?.sum_all()?.broadcast_div(&w.sum_all()?)
        }
    }
}

/// Per-class weights of the loss, "balanced" (scikit-learn's rule): photos / (classes × the
/// class's photos), so that every class weighs as much in the loss as the others.
pub fn balanced_weights(per_class: &[usize]) -> Vec<f32> {
    let total: usize = per_class.iter().sum();
    let k = per_class.len() as f64;
    per_class.iter().map(|&n| (total as f64 / (k * n.max(1) as f64)) as f32).collect()
}

/// Mixup of one batch: each input becomes `lambda` times itself plus `1 - lambda` times the
/// input at `partner` (a shuffle of the batch), and the loss is mixed the same way.
struct Mix {
    partner: Tensor,
    lambda: f64,
}

impl Mix {
    /// Draws the weight from Beta(alpha, alpha) and the partners from `rng`.
    fn draw(alpha: f64, n: usize, rng: &mut ChaCha8Rng, dev: &Device) -> candle_core::Result<Self> {
        let beta = rand_distr::Beta::new(alpha, alpha).map_err(|e| candle_core::Error::Msg(format!("mixup: {e}")))?;
        let lambda = rand_distr::Distribution::sample(&beta, rng);
        let mut partner: Vec<u32> = (0..n as u32).collect();
        partner.shuffle(rng);
        Ok(Self { partner: Tensor::new(partner, dev)?, lambda })
    }

    fn inputs(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        (x * self.lambda)? + (x.index_select(&self.partner, 0)? * (1.0 - self.lambda))?
    }

    fn loss(&self, logits: &Tensor, labels: &Tensor, eps: f64, w: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let own = smoothed_cross_entropy(logits, labels, eps, w)?;
        let other = smoothed_cross_entropy(logits, &labels.index_select(&self.partner, 0)?, eps, w)?;
        (own * self.lambda)? + (other * (1.0 - self.lambda))?
    }
}

/// Sets each variable to the tensor of the same position, returning the values it had.
fn swap_in(vars: &[(String, Var)], values: &[(String, Tensor)]) -> candle_core::Result<Vec<(String, Tensor)>> {
    let old = snapshot(vars)?;
    for ((_, var), (_, t)) in vars.iter().zip(values) {
        var.set(t)?;
    }
    Ok(old)
}

fn snapshot(vars: &[(String, Var)]) -> candle_core::Result<Vec<(String, Tensor)>> {
    vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?.detach()))).collect()
}

/// What every phase of a run works with.
struct PhaseRunner<'a> {
    cfg: &'a TrainConfig,
    net: &'a Trainable,
    caches: &'a [FeatureCache; 3],
    /// The run's checkpoint file, rewritten after every epoch.
    checkpoint: &'a Path,
    dev: &'a Device,
    classes: &'a [String],
    /// Per-class loss weights, when the classes are weighted.
    class_weights: Option<Tensor>,
}

impl PhaseRunner<'_> {
    /// What picks the best epoch.
    fn selection_name(&self) -> &'static str {
        if self.class_weights.is_some() {
            "macro-F1"
        } else {
            "accuracy"
        }
    }

    /// Runs `state.phase` from `state` (fresh, or `resumed` from a checkpoint) on the variables
    /// `vars`, leaving its best variables in place.
    fn run(
        &self,
        vars: Vec<(String, Var)>,
        state: &mut TrainState,
        resumed: Option<&Checkpoint>,
    ) -> anyhow::Result<()> {
        let (cfg, t, caches, dev) = (self.cfg, self.net, self.caches, self.dev);
        let phase = state.phase;
        let pc = cfg.phase(phase);
        let mut opt = Optimizer::new(pc.optimizer, vars.clone(), pc.weight_decay, pc.momentum)?;
        let mut best = snapshot(&vars)?;
        // The moving average of the weights (when on) starts from the phase's initial weights.
        let (epochs, patience, decay) = (pc.epochs.get(), pc.patience.get(), pc.ema.get());
        let mut ema = if decay > 0.0 { Some(snapshot(&vars)?) } else { None };
        if let Some(saved) = resumed {
            for (name, var) in &vars {
                var.set(&saved.get(Section::Vars, name)?)?;
            }
            for (n, t) in best.iter_mut() {
                *t = saved.get(Section::Best, n)?;
            }
            if let Some(e) = ema.as_mut() {
                for (n, t) in e.iter_mut() {
                    *t = saved.get(Section::Ema, n)?;
                }
            }
            opt.load_state(state.opt_step, |k| saved.get(Section::Optimizer, k).ok())?;
        }
        let train = &caches[0];
        let dropout = cfg.dropout;
        for epoch in state.next_epoch..epochs {
            if state.phase_done {
                break;
            }
            let start = Instant::now();
            let lr = learning_rate(pc, epoch, state.lr_factor);
            // Members of an ensemble share phase 1 and differ from phase 2 on (member 0 is the
            // plain run, drawn as before members existed).
            let member = if phase == Phase::FineTune { cfg.member } else { 0 };
            let mut rng = ChaCha8Rng::seed_from_u64(
                cfg.seed
                    ^ (u64::from(phase.number()) << 40)
                    ^ (epoch as u64) << 20
                    ^ member.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let v = (epoch + (member % train.variants as u64) as usize) % train.variants;
            let mut items: Vec<usize> = (0..train.n).map(|i| v * train.n + i).collect();
            items.shuffle(&mut rng);
            let pb = Progress::new(items.len(), &format!("phase {phase} epoch {}", epoch + 1));
            let (mut loss_sum, mut correct) = (0f64, 0usize);
            for batch in items.chunks(cfg.batch_size) {
                let mask = if dropout > 0.0 {
                    let keep = 1.0 - dropout;
                    let m: Vec<f32> = (0..batch.len() * cfg.inner)
                        .map(|_| if rng.random_bool(keep) { (1.0 / keep) as f32 } else { 0.0 })
                        .collect();
                    Some(Tensor::from_vec(m, (batch.len(), cfg.inner), dev)?)
                } else {
                    None
                };
                let mix = if pc.mixup > 0.0 { Some(Mix::draw(pc.mixup, batch.len(), &mut rng, dev)?) } else { None };
                let logits = t.logits(phase, train, batch, mask.as_ref(), mix.as_ref(), dev)?;
                let labels = train.labels_batch(batch, dev)?;
                let w = self.class_weights.as_ref();
                let ce = match &mix {
                    Some(m) => m.loss(&logits, &labels, cfg.label_smoothing, w)?,
                    None => smoothed_cross_entropy(&logits, &labels, cfg.label_smoothing, w)?,
                };
                let loss = (&ce + (t.l2()? * cfg.l2)?)?;
                let grads = loss.backward()?;
                opt.step(&grads, lr)?;
                if let Some(e) = ema.as_mut() {
                    for ((_, avg), (_, var)) in e.iter_mut().zip(&vars) {
                        // Detached: otherwise each average would hold on to the previous one, and
                        // through it to every average since the start of the phase.
                        *avg = ((&*avg * decay)? + (var.as_tensor().detach() * (1.0 - decay))?)?.detach();
                    }
                }
                loss_sum += ce.to_scalar::<f32>()? as f64 * batch.len() as f64;
                let p = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
                correct += p.iter().zip(batch).filter(|(p, &i)| **p == train.labels[i]).count();
                pb.inc(batch.len() as u64);
            }
            pb.finish();
            // Validation (and the best snapshot) with the averaged weights when averaging is on.
            let raw = match &ema {
                Some(e) => Some(swap_in(&vars, e)?),
                None => None,
            };
            let (val_loss, val_acc, val_pred) = t.evaluate(phase, &caches[1], dev)?;
            let val_f1 = metrics::evaluate(&val_pred, &caches[1].labels[..caches[1].n], self.classes).macro_f1;
            let e = Epoch {
                phase,
                epoch: epoch + 1,
                lr,
                train_loss: loss_sum / items.len() as f64,
                train_acc: correct as f64 / items.len() as f64,
                val_loss,
                val_acc,
                val_macro_f1: val_f1,
                seconds: start.elapsed().as_secs_f64(),
            };
            tracing::info!(
                "phase {phase} epoch {:>2}/{}: lr {:.2e}  train loss {:.4} acc {:.4}  val loss {:.4} acc {:.4}  ({:.0} s, {:.0} img/s)",
                e.epoch, epochs, lr, e.train_loss, e.train_acc, val_loss, val_acc, e.seconds, items.len() as f64 / e.seconds
            );
            state.history.push(e);
            // With class weights the score is macro-F1: accuracy would favour the large classes
            // the weights are there to counter.
            let score = if self.class_weights.is_some() { val_f1 } else { val_acc };
            if !cfg.refit.selects_epochs() {
                // Refit: the last epoch's weights, whatever validation says.
                best = snapshot(&vars)?;
            } else if score > state.best_acc || (score == state.best_acc && val_loss < state.best_loss) {
                (state.best_acc, state.best_loss, state.since_best) = (score, val_loss, 0);
                best = snapshot(&vars)?;
            } else {
                state.since_best += 1;
            }
            if let Some(raw) = raw {
                swap_in(&vars, &raw)?;
            }
            if pc.schedule == Schedule::ReduceOnPlateau {
                if val_loss < state.plateau_best - 1e-4 {
                    (state.plateau_best, state.plateau_wait) = (val_loss, 0);
                } else {
                    state.plateau_wait += 1;
                    if state.plateau_wait >= (patience / 2).max(1) {
                        (state.lr_factor, state.plateau_wait) = (state.lr_factor * 0.1, 0);
                    }
                }
            }
            state.next_epoch = epoch + 1;
            state.opt_step = opt.step;
            if cfg.refit.selects_epochs() && patience > 0 && state.since_best >= patience {
                tracing::info!(
                    "phase {phase}: no better validation {} for {patience} epochs, stopping",
                    self.selection_name()
                );
                state.phase_done = true;
            }
            let mut c = Checkpoint::new(state.clone());
            c.put(Section::Vars, vars.iter().map(|(n, v)| (n.as_str(), v.as_tensor().clone())));
            c.put(Section::Best, best.iter().map(|(n, t)| (n.as_str(), t.clone())));
            if let Some(e) = &ema {
                c.put(Section::Ema, e.iter().map(|(n, t)| (n.as_str(), t.clone())));
            }
            let moments = opt.state();
            c.put(Section::Optimizer, moments.iter().map(|(n, t)| (n.as_str(), t.clone())));
            c.save(self.checkpoint)?;
        }
        // Early stopping restores the best epoch's variables.
        for ((_, var), (_, b)) in vars.iter().zip(&best) {
            var.set(b)?;
        }
        Ok(())
    }
}

/// What the frozen part of the network gives once for a configuration: the class names, the
/// feature caches of the three splits and the base's tensors. A sweep reuses it across runs.
pub struct Prepared {
    pub classes: Vec<String>,
    pub caches: [FeatureCache; 3],
    pub base_tensors: HashMap<String, Tensor>,
    pub prep: Preprocessing,
    /// The folder's photos and their splits.
    pub dataset: Dataset,
    /// The photos of each cache, in cache order (the readable ones).
    pub paths: [Vec<PathBuf>; 3],
    /// Unreadable photos (path, reason).
    pub skipped: Vec<(PathBuf, String)>,
    /// Photos found in two splits (byte for byte, or nearly by their pooled features).
    pub leaks: Vec<crate::leaks::Leak>,
    /// What the `auto` settings are chosen from.
    pub size: DataSize,
}

/// The data folder in whichever layout it is (missing splits carved), the refit applied.
pub fn dataset(cfg: &TrainConfig) -> anyhow::Result<Dataset> {
    let carve = data::Carve { validation: cfg.validation_fraction, test: cfg.test_fraction, seed: cfg.seed };
    Ok(data::scan(&cfg.data, &carve)?.refit(cfg.refit))
}

/// The training photos per class, and their median shorter side (read from up to 400 photos'
/// headers: computed once per run).
pub fn data_size(ds: &Dataset) -> DataSize {
    DataSize { per_class: ds.counts()[0].clone(), short_side: data::median_short_side(&ds.splits[0]) }
}

/// Reads the data and builds the feature caches with the frozen ImageNet base.
pub fn prepare(cfg: &TrainConfig, dev: &Device) -> anyhow::Result<Prepared> {
    cfg.validate()?;
    let ds = dataset(cfg)?;
    let size = data_size(&ds);
    prepare_dataset(&cfg.resolve(&size), ds, size, dev)
}

/// Logs what the folder holds: its layout, photos per class and split, files passed over.
fn log_dataset(cfg: &TrainConfig, ds: &Dataset, size: &DataSize) {
    tracing::info!(
        "{}: {}; classes {:?}; {} / {} / {} image files (unreadable ones are reported when their split is loaded); {} px, {}",
        cfg.data.display(),
        ds.layout,
        ds.classes,
        ds.splits[0].len(),
        ds.splits[1].len(),
        ds.splits[2].len(),
        cfg.image_size.get(),
        match cfg.resize {
            modelspec::Fit::Stretch => "photos stretched to the square",
            modelspec::Fit::Crop => "photos cropped to their centre square",
        }
    );
    let counts = ds.counts();
    for (c, class) in ds.classes.iter().enumerate() {
        tracing::info!(
            "  {class:<16} train {:>6}  validation {:>5}  test {:>5}",
            counts[0][c],
            counts[1][c],
            counts[2][c]
        );
    }
    if size.per_class.iter().any(|&n| n < data::FEW_PHOTOS) {
        tracing::warn!(
            "fewer than {} training photos in a class: expect figures that move by whole photos from run to run",
            data::FEW_PHOTOS
        );
    }
    if !ds.ignored.is_empty() {
        tracing::warn!("{} files in the class folders are not JPEG, PNG or WebP and were not read:", ds.ignored.len());
        for p in ds.ignored.iter().take(20) {
            tracing::warn!("  {}", p.display());
        }
    }
    if !ds.has_test() {
        tracing::warn!(
            "no test split: the final figure is validation's, which also chose the epochs (an optimistic figure)"
        );
    }
}

/// [`prepare`] for a scanned folder and a resolved configuration.
pub fn prepare_dataset(cfg: &TrainConfig, ds: Dataset, size: DataSize, dev: &Device) -> anyhow::Result<Prepared> {
    let prep = Preprocessing { fit: cfg.resize, ..Preprocessing::default() };
    log_dataset(cfg, &ds, &size);
    tracing::info!("{}", cfg.describe_resolved(&size));
    match cfg.refit {
        Refit::Off => {}
        Refit::Half => tracing::info!(
            "refit half: every other validation photo trains; validation reports the other {}",
            ds.splits[1].len()
        ),
        Refit::All => {
            tracing::warn!("refit all: the validation photos train too; validation figures are on photos trained on")
        }
    }
    let base_dir =
        ModelDir::load(&cfg.base, dev).with_context(|| format!("loading the base model {}", cfg.base.display()))?;
    let opts = XceptionOptions { trainable_from: None, compute_dtype: cfg.precision.dtype() };
    let frozen = Xception::new(base_dir.var_builder(dev), opts)?;
    let upto = cache_upto(cfg);
    let mut engine = cache_engine(cfg, &base_dir, &frozen, upto, dev)?;
    tracing::info!("feature caches: frozen blocks on {}", engine.name());
    let tc = Instant::now();
    let mut caches = Vec::new();
    let (mut paths, mut all_skipped): ([Vec<PathBuf>; 3], _) = (Default::default(), Vec::new());
    for (i, split) in SPLITS.iter().enumerate() {
        let spec = CacheSpec {
            variants: if i == 0 && cfg.augment.enabled { cfg.variants.get() } else { 1 },
            augment: &cfg.augment,
            seed: cfg.seed,
            stream: i as u64,
            upto,
            maps: cfg.fine_tunes(),
            batch: 32,
            prep: &prep,
            dtype: cfg.precision.dtype(),
        };
        if i == 2 && (!cfg.evaluate_test || !ds.has_test()) {
            // Not looked at, or none: an empty cache.
            let empty = Images { size: cfg.image_size.get(), pixels: vec![], labels: vec![], paths: vec![] };
            caches.push(features::build(&mut engine, &empty, &spec, None, "features test", dev)?);
            continue;
        }
        // One split's decoded photos in memory at a time, dropped once its cache is built: at
        // 299 px the three splits' pixels alone are 3.5 GB.
        let (images, skipped) =
            data::load(&ds.splits[i], cfg.image_size.get(), &prep, cfg.strict, &format!("loading {split}"))?;
        if !skipped.is_empty() {
            tracing::warn!("{split}: skipped {} unreadable images:", skipped.len());
            for (p, why) in &skipped {
                tracing::warn!("  {}: {why}", p.display());
            }
        }
        all_skipped.extend(skipped);
        paths[i] = images.paths.clone();
        let keys = features::disk_keys(&images, &spec, &cfg.base.join(modelspec::WEIGHTS_FILE), &engine.name());
        let disk = (!cfg.feature_cache.as_os_str().is_empty()).then_some(cfg.feature_cache.as_path());
        if let Some(c) = disk.and_then(|d| features::load(d, &keys, spec.maps)) {
            tracing::info!("{split}: feature cache read from {}", cfg.feature_cache.display());
            caches.push(c);
            continue;
        }
        let t = Instant::now();
        let c =
            features::build(&mut engine, &images, &spec, disk.map(|d| (d, &keys)), &format!("features {split}"), dev)?;
        tracing::info!(
            "{split}: {} items through the frozen blocks in {:.0} s ({:.1} img/s)",
            c.items(),
            t.elapsed().as_secs_f64(),
            c.items() as f64 / t.elapsed().as_secs_f64()
        );
        caches.push(c);
    }
    let caches: [FeatureCache; 3] = caches.try_into().map_err(|_| anyhow::anyhow!("three splits"))?;
    let cached: usize = caches.iter().map(|c| c.items()).sum();
    tracing::info!("feature cache: {cached} items through blocks 1-{upto} in {:.0} s", tc.elapsed().as_secs_f64());
    // A refit of every validation photo puts each of them in train on purpose: no leak to find.
    let leaks = if cfg.refit == Refit::All {
        Vec::new()
    } else {
        let leaks = crate::leaks::find(&paths, &caches, cfg.near_duplicate);
        crate::leaks::log(&leaks);
        leaks
    };
    Ok(Prepared {
        classes: ds.classes.clone(),
        caches,
        base_tensors: base_dir.tensors,
        prep,
        dataset: ds,
        paths,
        skipped: all_skipped,
        leaks,
        size,
    })
}

/// The engine of the feature caches (see [`CacheEngine`]).
fn cache_engine<'a>(
    cfg: &TrainConfig,
    base_dir: &ModelDir,
    frozen: &'a Xception,
    upto: usize,
    dev: &Device,
) -> anyhow::Result<Engine<'a>> {
    let usable = dev.is_cpu() && cfg.precision == ComputePrecision::F32;
    match cfg.cache_engine {
        CacheEngine::Candle => return Ok(Engine::Candle(frozen)),
        CacheEngine::Auto if !usable => return Ok(Engine::Candle(frozen)),
        CacheEngine::Onnxruntime if !usable => {
            bail!("cache_engine onnxruntime: only for f32 training on the CPU (use auto or candle)")
        }
        _ => {}
    }
    let build = || -> anyhow::Result<Engine<'a>> {
        let weights: onnxgraph::Weights = base_dir
            .tensors
            .iter()
            .map(|(k, t)| {
                Ok((k.clone(), (t.dims().to_vec(), t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)))
            })
            .collect::<anyhow::Result<_>>()?;
        let model = onnxgraph::build_frozen(&weights, cfg.image_size.get(), upto)?;
        let bytes = prost::Message::encode_to_vec(&model);
        let name = PathBuf::from(format!("<frozen blocks 1-{upto}>"));
        let session = inference::session::FloatSession::from_bytes(&bytes, &name, 0, cfg.ort_lib.as_deref())?;
        let mut engine = Engine::OnnxRuntime { session: Box::new(session), upto, check: frozen };
        // Two seeded noise images through both engines before any photo: a library that
        // disagrees is not used (each cache's first batch of photos is checked again).
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let noise: Vec<f32> =
            (0..2 * cfg.image_size.get() * cfg.image_size.get() * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
        let d = engine.check(&noise, cfg.image_size.get(), upto, dev)?.expect("an ONNX Runtime engine checks");
        anyhow::ensure!(
            d <= features::ENGINE_TOLERANCE,
            "its features differ from Candle's by {d:.1e} (relative), over {:.0e}",
            features::ENGINE_TOLERANCE
        );
        Ok(engine)
    };
    match build() {
        Ok(e) => Ok(e),
        Err(e) if cfg.cache_engine == CacheEngine::Auto => {
            tracing::warn!("ONNX Runtime unavailable for the feature caches, using Candle: {e:#}");
            Ok(Engine::Candle(frozen))
        }
        Err(e) => Err(e.context("cache_engine onnxruntime")),
    }
}

/// The last frozen block, whose output the cache holds.
fn cache_upto(cfg: &TrainConfig) -> usize {
    if cfg.fine_tunes() {
        cfg.fine_tune_from - 1
    } else {
        NUM_BLOCKS
    }
}

/// Runs a whole training; `resume` continues from the run directory's checkpoint if any.
pub fn run(cfg: &TrainConfig, resume: bool, dev: &Device) -> anyhow::Result<Outcome> {
    cfg.validate()?;
    let t0 = Instant::now();
    // The settings left `auto` are chosen for this folder's photos before anything else, so that
    // the saved config.toml says what the run does (and a resume is checked against it).
    let ds = dataset(cfg)?;
    let size = data_size(&ds);
    let cfg = &cfg.resolve(&size);
    let out = &cfg.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let ckpt_path = out.join("checkpoint.safetensors");
    let config_path = out.join("config.toml");
    let mut resumed = None;
    if resume && ckpt_path.exists() {
        let saved = std::fs::read_to_string(&config_path).unwrap_or_default();
        if saved != cfg.to_toml() {
            bail!(
                "{}: the run was started with another configuration; resume with the same flags or config",
                config_path.display()
            );
        }
        resumed = Some(Checkpoint::load(&ckpt_path, dev)?);
        tracing::info!("resuming from {}", ckpt_path.display());
    } else if resume {
        tracing::warn!("--resume: no checkpoint in {}, starting afresh", out.display());
    }
    std::fs::write(&config_path, cfg.to_toml()).with_context(|| format!("writing {}", config_path.display()))?;
    let prepared = prepare_dataset(cfg, ds, size, dev)?;
    let mut o = train_prepared(cfg, &prepared, resumed, dev)?;
    o.seconds = t0.elapsed().as_secs_f64();
    Ok(o)
}

/// Trains on prepared caches (both phases) and writes the run directory `cfg.out`.
pub fn train_prepared(
    cfg: &TrainConfig,
    p: &Prepared,
    resumed: Option<Checkpoint>,
    dev: &Device,
) -> anyhow::Result<Outcome> {
    let t0 = Instant::now();
    let cfg = &cfg.resolve(&p.size);
    let out = &cfg.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let splits_path = out.join(modelspec::splits::SPLITS_FILE);
    modelspec::splits::write(&splits_path, &p.dataset.rows())?;
    let ckpt_path = out.join("checkpoint.safetensors");
    let caches = &p.caches;
    let fine_tune = cfg.fine_tunes();
    if fine_tune && caches[0].map_dims[0] != models::layers::output_size_after(cfg.image_size.get(), cache_upto(cfg)) {
        bail!("feature caches were built for another image size or block");
    }
    // The trainable network: base variables from the ImageNet weights, a seeded new head.
    let classes = p.classes.len();
    let head_cfg = Head { inner: cfg.inner, dropout: cfg.dropout as f32, classes };
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (k, t) in &p.base_tensors {
            data.insert(k.clone(), Var::from_tensor(t)?);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        for (name, cin, cout) in [(DENSE, FEATURES, cfg.inner), (LOGITS, cfg.inner, classes)] {
            let (w, b) = dense_init(&mut rng, cin, cout, dev)?;
            data.insert(format!("{name}.weight"), Var::from_tensor(&w)?);
            data.insert(format!("{name}.bias"), Var::from_tensor(&b)?);
        }
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let opts = XceptionOptions {
        trainable_from: fine_tune.then_some(cfg.fine_tune_from),
        compute_dtype: cfg.precision.dtype(),
    };
    let base = Xception::new(vb.clone(), opts)?;
    let head = ClassifierHead::new(&head_cfg, FEATURES, vb)?;
    let vars: HashMap<String, Var> = varmap.data().lock().expect("varmap lock").clone();
    let t = Trainable { base, head, from: cfg.fine_tune_from, vars };
    let pick = |f: &dyn Fn(&str) -> bool| -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> =
            t.vars.iter().filter(|(k, _)| f(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let head_vars = pick(&|k: &str| k.starts_with("head_"));
    // Batch-norm statistics stay fixed (inference mode); gamma and beta train, as in Keras.
    let ft_vars = pick(&|k: &str| {
        k.starts_with("head_")
            || (block_of(k).is_some_and(|b| b >= cfg.fine_tune_from)
                && !k.ends_with("moving_mean")
                && !k.ends_with("moving_variance"))
    });

    let class_weights = match cfg.class_weights {
        ClassWeights::On => {
            let w = balanced_weights(&p.size.per_class);
            tracing::info!("class weights of the loss: {:?}", p.classes.iter().zip(&w).collect::<Vec<_>>());
            Some(Tensor::new(w, dev)?)
        }
        _ => None,
    };
    let runner = PhaseRunner { cfg, net: &t, caches, checkpoint: &ckpt_path, dev, classes: &p.classes, class_weights };
    let (mut state, saved) = match resumed {
        Some(c) => (c.state.clone(), Some(c)),
        None => (TrainState::start(Phase::Head, Vec::new()), None),
    };
    if state.phase == Phase::Head {
        runner.run(head_vars, &mut state, saved.as_ref())?;
        state = TrainState::start(Phase::FineTune, std::mem::take(&mut state.history));
        if fine_tune {
            runner.run(ft_vars, &mut state, None)?;
        }
    } else if fine_tune {
        runner.run(ft_vars, &mut state, saved.as_ref())?;
    }

    // Final metrics.
    let phase = if fine_tune { Phase::FineTune } else { Phase::Head };
    // Each split's figures and its mistakes (most confident first), for the report.
    let judged = |i: usize| -> candle_core::Result<(Report, Vec<crate::report::Mistake>)> {
        let (_, _, pred, probs) = t.evaluate_with_probabilities(phase, &caches[i], true, dev)?;
        let labels = &caches[i].labels[..caches[i].n];
        let mistakes = crate::report::mistakes(&p.paths[i], labels, &pred, &probs, &p.classes);
        Ok((metrics::evaluate(&pred, labels, &p.classes), mistakes))
    };
    let (validation, val_mistakes) = judged(1)?;
    let has_test = p.dataset.has_test();
    let (test, test_mistakes) = match cfg.evaluate_test && has_test {
        true => {
            let (r, m) = judged(2)?;
            (Some(r), m)
        }
        false => (None, Vec::new()),
    };
    let seconds = t0.elapsed().as_secs_f64();

    // The run directory.
    let metrics_json = serde_json::json!({
        "validation": validation,
        "test": test,
        "seconds": seconds,
        "epochs": state.history.len(),
        "refit": cfg.refit,
        // Which figure is the final one: test's, or validation's when the folder has no test
        // split (it chose the epochs too).
        "final": if test.is_some() { "test" } else if has_test { "test not evaluated (--skip-test)" } else { "validation (no test split)" },
        "layout": p.dataset.layout,
        "class_weights": cfg.class_weights,
        "leaks": p.leaks.len(),
    });
    // With every validation photo trained on, its accuracy is not a score of the model.
    let validation_score = (cfg.refit != Refit::All).then_some(validation.accuracy);
    let description = ModelDescription {
        format: FORMAT_VERSION,
        name: cfg.name.clone(),
        architecture: modelspec::Architecture::Xception,
        input_size: cfg.image_size.get(),
        layout: modelspec::Layout::Nhwc,
        preprocessing: p.prep.clone(),
        head: Some(head_cfg),
        classes: p.classes.clone(),
        source: format!("trainer run {} on {}", out.display(), cfg.data.display()),
        dataset: Some(cfg.data.clone()),
        metrics: Some(serde_json::json!({
            "test_accuracy": test.as_ref().map(|t| t.accuracy),
            "test_macro_f1": test.as_ref().map(|t| t.macro_f1),
            "validation_accuracy": validation_score,
        })),
    };
    let tensors: Vec<(String, Tensor)> = expected_tensors(&description)
        .iter()
        .map(|s| {
            Ok((
                s.name.clone(),
                t.vars.get(&s.name).with_context(|| format!("no variable {}", s.name))?.as_tensor().clone(),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    write_model_files(out, &description, &tensors)?;
    std::fs::write(out.join("metrics.json"), serde_json::to_string_pretty(&metrics_json)?)?;
    std::fs::write(out.join("history.json"), serde_json::to_string_pretty(&state.history)?)?;
    history::write_csv(&state.history, &out.join("history.csv"))?;
    if let Some(test) = &test {
        test.write_csv(&out.join("test_metrics.csv"))?;
    }
    validation.write_csv(&out.join("validation_metrics.csv"))?;
    let mut plots =
        vec![("learning_curves.png", crate::plots::learning_curves(&state.history, &out.join("learning_curves.png")))];
    if let Some(test) = &test {
        plots.push(("confusion_test.png", crate::plots::confusion(test, "test", &out.join("confusion_test.png"))));
    }
    plots.push((
        "confusion_validation.png",
        crate::plots::confusion(&validation, "validation", &out.join("confusion_validation.png")),
    ));
    for (what, r) in plots {
        if let Err(e) = r {
            tracing::warn!("{what}: {e}");
        }
    }
    let report = crate::report::RunReport {
        cfg,
        dataset: &p.dataset,
        history: &state.history,
        validation: &validation,
        test: test.as_ref(),
        mistakes: [&val_mistakes, &test_mistakes],
        leaks: &p.leaks,
        skipped: &p.skipped,
    };
    if let Err(e) = crate::report::write(out, &report) {
        tracing::warn!("the report in {}: {e:#}", out.display());
    }
    // How unlike the training photos an image is (for the ONNX graph, not built in yet); a
    // run whose fit fails still has its weights, and says why.
    if let Err(e) = crate::ood::fit_run(out, p, fine_tune.then_some(cfg.fine_tune_from), dev) {
        tracing::warn!("no out-of-distribution score: {e:#}");
    }
    let _ = std::fs::remove_file(&ckpt_path);
    Ok(Outcome { run_dir: out.clone(), validation, test, seconds, has_test_split: has_test })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixup_mixes_inputs_and_losses_with_the_same_partner_and_weight() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let m = Mix::draw(0.2, 4, &mut rng, &dev).unwrap();
        assert!((0.0..=1.0).contains(&m.lambda), "lambda {}", m.lambda);
        let partner = m.partner.to_vec1::<u32>().unwrap();
        let mut sorted = partner.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3], "partners are not a permutation of the batch");

        let x = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.], [7., 8.]], &dev).unwrap();
        let mixed = m.inputs(&x).unwrap().to_vec2::<f32>().unwrap();
        let rows = x.to_vec2::<f32>().unwrap();
        for (i, row) in mixed.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let want = m.lambda as f32 * rows[i][j] + (1.0 - m.lambda as f32) * rows[partner[i] as usize][j];
                assert!((v - want).abs() < 1e-5, "row {i} col {j}: {v} vs {want}");
            }
        }

        let logits = Tensor::new(&[[2f32, 0., -1.], [0., 1., 0.], [-1., 0., 3.], [1., 1., 1.]], &dev).unwrap();
        let labels = Tensor::new(&[0u32, 1, 2, 0], &dev).unwrap();
        let got = m.loss(&logits, &labels, 0.1, None).unwrap().to_scalar::<f32>().unwrap();
        let own = smoothed_cross_entropy(&logits, &labels, 0.1, None).unwrap().to_scalar::<f32>().unwrap();
        let swapped: Vec<u32> = partner.iter().map(|&p| [0u32, 1, 2, 0][p as usize]).collect();
        let other = smoothed_cross_entropy(&logits, &Tensor::new(swapped, &dev).unwrap(), 0.1, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = m.lambda as f32 * own + (1.0 - m.lambda as f32) * other;
        assert!((got - want).abs() < 1e-5, "mixed loss {got} vs {want}");

        // Same generator state, same draw: mixup keeps runs reproducible.
        let again = Mix::draw(0.2, 4, &mut ChaCha8Rng::seed_from_u64(3), &dev).unwrap();
        assert_eq!(again.lambda, m.lambda);
        assert_eq!(again.partner.to_vec1::<u32>().unwrap(), partner);
    }

    /// Weighted: each item counts by its class's weight, normalised by the weights' sum; equal
    /// weights give the plain loss.
    #[test]
    fn class_weights_weigh_each_item_by_its_class() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2f32, 0.], [0., 1.], [1., 3.]], &dev).unwrap();
        let labels = Tensor::new(&[0u32, 1, 1], &dev).unwrap();
        let plain = smoothed_cross_entropy(&logits, &labels, 0.1, None).unwrap().to_scalar::<f32>().unwrap();
        let ones = Tensor::new(&[1f32, 1.], &dev).unwrap();
        let same = smoothed_cross_entropy(&logits, &labels, 0.1, Some(&ones)).unwrap().to_scalar::<f32>().unwrap();
        assert!((plain - same).abs() < 1e-6, "{plain} vs {same}");
        // Class 0 three times as heavy: (3 l0 + l1 + l2) / 5.
        let w = Tensor::new(&[3f32, 1.], &dev).unwrap();
        let got = smoothed_cross_entropy(&logits, &labels, 0.0, Some(&w)).unwrap().to_scalar::<f32>().unwrap();
        let item = |i: usize| {
            let row = logits.get(i).unwrap().unsqueeze(0).unwrap();
            let l = labels.narrow(0, i, 1).unwrap();
            candle_nn::loss::cross_entropy(&row, &l).unwrap().to_scalar::<f32>().unwrap()
        };
        let want = (3.0 * item(0) + item(1) + item(2)) / 5.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // Balanced weights: photos / (classes x class photos).
        assert_eq!(balanced_weights(&[300, 100]), vec![2.0 / 3.0, 2.0]);
        assert_eq!(balanced_weights(&[50, 50]), vec![1.0, 1.0]);
    }
}
