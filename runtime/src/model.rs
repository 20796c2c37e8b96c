//! The model being served: one loaded file's sessions behind their batcher, what its metadata
//! says, and its Triton-style statistics. A reload builds a new [`Served`] beside the old one
//! (load, check, warm up) and swaps the pointer: requests already holding the old one finish on
//! it, and its sessions stop when the last of them is done (the batcher's queue closes when the
//! last `Arc<Served>` goes).

use crate::batcher::{BatchConfig, Batched, Batcher, SubmitError};
use crate::metrics::{BatchEvent, BatchObserver};
use anyhow::{bail, Context};
use inference::OnnxModel;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Loads the sessions of a model file (as many as the server runs), without warming them up.
pub type Loader = Arc<dyn Fn(&Path) -> anyhow::Result<Vec<OnnxModel>> + Send + Sync>;

/// One loaded model file, serving.
pub struct Served {
    pub batcher: Batcher,
    pub name: String,
    /// The file's `model_version` metadata, as Triton writes versions (a decimal string).
    pub version: String,
    pub classes: Vec<String>,
    pub size: usize,
    pub preprocessing: modelspec::Preprocessing,
    pub precision: String,
    /// The file's out-of-distribution threshold (its `ood_score` output), `None` for a file
    /// without it or with `--ood off`.
    pub ood: Option<modelspec::onnx_meta::OodMeta>,
    pub file: PathBuf,
    /// When it was swapped in, milliseconds since the epoch.
    pub loaded_ms: u64,
    pub stats: Arc<Stats>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Served {
    /// Checks and warms up every session (one image of zeros each: ONNX Runtime allocates and
    /// plans on its first run, which would otherwise land on the first client), then starts
    /// their batcher. An error says which check failed; nothing is started then.
    /// `ood`: answer `unknown` beyond the file's out-of-distribution threshold (when it has one).
    pub fn start(
        mut sessions: Vec<OnnxModel>,
        file: &Path,
        batch: BatchConfig,
        observe: BatchObserver,
        ood: bool,
    ) -> anyhow::Result<Self> {
        let Some(first) = sessions.first() else { bail!("no session to serve {}", file.display()) };
        let d = &first.info.description;
        let (name, classes, size) = (d.name.clone(), d.classes.clone(), d.input_size);
        let (version, precision) = (first.info.model_version.to_string(), first.info.precision.to_string());
        let preprocessing = d.preprocessing.clone();
        let ood = first.info.ood.clone().filter(|_| ood);
        if classes.is_empty() || size == 0 {
            bail!("{}: the metadata names no classes or no input size", file.display());
        }
        for (i, s) in sessions.iter_mut().enumerate() {
            let p = s
                .run(vec![0u8; size * size * 3], 1)
                .with_context(|| format!("{}: warm-up run of session {i}", file.display()))?;
            let ok = p.len() == 1
                && p[0].probabilities.len() == classes.len()
                && p[0].probabilities.iter().chain(&p[0].logits).all(|v| v.is_finite())
                && (ood.is_none() || p[0].ood_score.is_some_and(f32::is_finite));
            if !ok {
                bail!(
                    "{}: warm-up run of session {i} gave {} rows of {:?} for 1 image and {} classes",
                    file.display(),
                    p.len(),
                    p.first().map(|p| p.probabilities.len()),
                    classes.len()
                );
            }
        }
        let stats = Arc::new(Stats::default());
        let local = stats.clone();
        let observe: BatchObserver = Arc::new(move |e| {
            local.batch(e);
            observe(e)
        });
        let batcher = Batcher::start(sessions, batch, observe);
        Ok(Self {
            batcher,
            name,
            version,
            classes,
            size,
            preprocessing,
            precision,
            ood,
            file: file.to_path_buf(),
            loaded_ms: now_ms(),
            stats,
        })
    }

    /// Queues `n` images and waits up to `timeout` for their predictions; counts the request in
    /// the statistics (`started`: when the request began, for its total time).
    pub async fn infer(
        &self,
        pixels: Vec<u8>,
        n: usize,
        timeout: Duration,
        started: std::time::Instant,
    ) -> Result<Batched, InferError> {
        let r = match tokio::time::timeout(timeout, self.batcher.submit(pixels, n)).await {
            Err(_) => Err(InferError::Timeout(timeout)),
            Ok(Err(SubmitError::QueueFull(q))) => Err(InferError::QueueFull(q)),
            Ok(Err(e)) => Err(InferError::Failed(e.to_string())),
            Ok(Ok(b)) => Ok(b),
        };
        match &r {
            Ok(b) => self.stats.request(true, n, started.elapsed(), Some(b)),
            Err(_) => self.stats.request(false, n, started.elapsed(), None),
        }
        r
    }

    /// Ready: every session is warm and at least one worker runs.
    pub fn ready(&self) -> bool {
        self.batcher.live() > 0
    }
}

/// Why [`Served::infer`] gave no predictions.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("no answer within {0:?}; the server is overloaded, retry later")]
    Timeout(Duration),
    #[error("{0} requests are already waiting for a session; retry later")]
    QueueFull(usize),
    #[error("{0}")]
    Failed(String),
}

/// A cumulative count and duration (Triton's `StatisticDuration`).
#[derive(Default)]
pub struct Tally {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Tally {
    fn add(&self, d: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
    pub fn get(&self) -> (u64, u64) {
        (self.count.load(Ordering::Relaxed), self.ns.load(Ordering::Relaxed))
    }
}

/// Triton's per-model statistics: requests that succeeded or failed (whole time in the server),
/// their queue and compute times, images inferred, batches run and per-batch-size times.
#[derive(Default)]
pub struct Stats {
    pub success: Tally,
    pub fail: Tally,
    pub queue: Tally,
    pub compute_infer: Tally,
    pub inference_count: AtomicU64,
    pub execution_count: AtomicU64,
    pub last_inference_ms: AtomicU64,
    /// Batch size → (batches, nanoseconds in ONNX Runtime).
    pub batches: Mutex<BTreeMap<usize, (u64, u64)>>,
}

impl Stats {
    fn request(&self, ok: bool, n: usize, total: Duration, b: Option<&Batched>) {
        self.last_inference_ms.store(now_ms(), Ordering::Relaxed);
        if !ok {
            self.fail.add(total);
            return;
        }
        self.success.add(total);
        self.inference_count.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(b) = b {
            self.queue.add(b.queue);
            self.compute_infer.add(b.inference);
        }
    }

    fn batch(&self, e: BatchEvent) {
        if let BatchEvent::Ran { images, time } = e {
            self.execution_count.fetch_add(1, Ordering::Relaxed);
            let mut b = self.batches.lock().unwrap_or_else(|p| p.into_inner());
            let entry = b.entry(images).or_default();
            entry.0 += 1;
            entry.1 += time.as_nanos() as u64;
        }
    }

    /// As Triton's HTTP statistics extension writes one model's entry.
    pub fn to_json(&self, name: &str, version: &str) -> serde_json::Value {
        let d = |x: &Tally| {
            let (count, ns) = x.get();
            serde_json::json!({"count": count, "ns": ns})
        };
        let zero = serde_json::json!({"count": 0, "ns": 0});
        let batches: Vec<serde_json::Value> = self
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(size, (count, ns))| {
                serde_json::json!({
                    "batch_size": size,
                    "compute_input": {"count": count, "ns": 0},
                    "compute_infer": {"count": count, "ns": ns},
                    "compute_output": {"count": count, "ns": 0},
                })
            })
            .collect();
        serde_json::json!({
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms.load(Ordering::Relaxed),
            "inference_count": self.inference_count.load(Ordering::Relaxed),
            "execution_count": self.execution_count.load(Ordering::Relaxed),
            "inference_stats": {
                "success": d(&self.success),
                "fail": d(&self.fail),
                "queue": d(&self.queue),
                "compute_input": zero,
                "compute_infer": d(&self.compute_infer),
                "compute_output": zero,
            },
            "batch_stats": batches,
        })
    }
}
