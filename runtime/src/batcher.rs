//! Dynamic micro-batching over a pool of sessions. Requests (each one or more images) queue on
//! one channel; each session's worker thread takes the first waiting request, then gathers more
//! until the batch holds `max_batch` images or `max_delay` has passed since it began, runs them
//! as one batch and answers every request with its own rows.

use crate::metrics::BatchObserver;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use inference::{OnnxModel, Prediction};
use std::time::{Duration, Instant};

/// How a request fared in the batcher.
#[derive(Debug, Clone)]
pub struct Batched {
    pub predictions: Vec<Prediction>,
    /// Time the request waited before its batch started.
    pub queue: Duration,
    /// Time the batch took in ONNX Runtime.
    pub inference: Duration,
    /// Images in the batch the request ran in.
    pub batch_size: usize,
}

struct Job {
    pixels: Vec<u8>,
    n: usize,
    enqueued: Instant,
    reply: tokio::sync::oneshot::Sender<Result<Batched, String>>,
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most images in one batch.
    pub max_batch: usize,
    /// Longest the first request of a batch waits for more.
    pub max_delay: Duration,
    /// Most requests waiting for a session; a request beyond it is refused at once.
    pub max_queue: usize,
}

/// Why a request got no predictions.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    #[error("{0} requests are already waiting for a session")]
    QueueFull(usize),
    #[error("the sessions have stopped")]
    Stopped,
    #[error("{0}")]
    Failed(String),
}

impl BatchConfig {
    /// Images per batch by default. On 2 CPU cores ONNX Runtime runs no faster per image in
    /// larger batches (41 img/s at 1 and at 16; docs/benchmarks.md) and its arena keeps the
    /// largest batch resident; raise it on a GPU or a many-core machine.
    pub const DEFAULT_MAX_BATCH: usize = 2;
    /// Milliseconds a batch waits for more requests by default.
    pub const DEFAULT_MAX_DELAY_MS: u64 = 5;
    /// Requests that may wait for a session by default.
    pub const DEFAULT_MAX_QUEUE: usize = 32;
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: Self::DEFAULT_MAX_BATCH,
            max_delay: Duration::from_millis(Self::DEFAULT_MAX_DELAY_MS),
            max_queue: Self::DEFAULT_MAX_QUEUE,
        }
    }
}

/// The queue in front of the sessions.
pub struct Batcher {
    tx: Sender<Job>,
    rx: Receiver<Job>,
}

impl Batcher {
    /// Starts one worker thread per session; `observe` hears of every batch run.
    pub fn start(sessions: Vec<OnnxModel>, config: BatchConfig, observe: BatchObserver) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(config.max_queue.max(1));
        for (i, model) in sessions.into_iter().enumerate() {
            let (rx, observe) = (rx.clone(), observe.clone());
            std::thread::Builder::new()
                .name(format!("session-{i}"))
                .spawn(move || worker(model, rx, config, observe))
                .expect("spawning a session thread");
        }
        Self { tx, rx }
    }

    /// Requests waiting for a session.
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    /// Queues `n` images (`pixels`: n · size · size · 3 bytes) and waits for their predictions;
    /// refused at once when the queue is full.
    pub async fn submit(&self, pixels: Vec<u8>, n: usize) -> Result<Batched, SubmitError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx.try_send(Job { pixels, n, enqueued: Instant::now(), reply }).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::QueueFull(self.tx.capacity().unwrap_or(0)),
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })?;
        answer
            .await
            .map_err(|_| SubmitError::Failed("the session dropped the request".into()))?
            .map_err(SubmitError::Failed)
    }
}

fn worker(mut model: OnnxModel, rx: Receiver<Job>, cfg: BatchConfig, observe: BatchObserver) {
    let mut carry: Option<Job> = None;
    loop {
        let first = match carry.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return, // every sender is gone: shutting down
            },
        };
        let deadline = Instant::now() + cfg.max_delay;
        let mut total = first.n;
        let mut jobs = vec![first];
        while total < cfg.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) if total + j.n <= cfg.max_batch => {
                    total += j.n;
                    jobs.push(j);
                }
                Ok(j) => {
                    carry = Some(j);
                    break;
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // Requests whose client has gone (timeout, disconnect) are dropped before running.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let total: usize = jobs.iter().map(|j| j.n).sum();
        let start = Instant::now();
        let mut pixels = Vec::with_capacity(jobs.iter().map(|j| j.pixels.len()).sum());
        for j in &jobs {
            pixels.extend_from_slice(&j.pixels);
        }
        let result = model.run(pixels, total);
        let inference = start.elapsed();
        observe(total, inference);
        match result {
            Ok(preds) => {
                let mut rows = preds.into_iter();
                for j in jobs {
                    let predictions: Vec<Prediction> = rows.by_ref().take(j.n).collect();
                    let queue = start.duration_since(j.enqueued);
                    let _ = j.reply.send(Ok(Batched { predictions, queue, inference, batch_size: total }));
                }
            }
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(e.to_string()));
                }
            }
        }
    }
}
