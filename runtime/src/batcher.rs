//! Dynamic micro-batching over a pool of sessions. Requests (each one or more images) queue on
//! one channel; each session's worker thread takes the first waiting request, then gathers more
//! until the batch holds `max_batch` images or `max_delay` has passed since it began, runs them
//! as one batch and answers every request with its own rows.
//!
//! A failure in a batch (an ONNX Runtime error, a panic, a wrong number of rows) answers that
//! batch's requests with the error and the worker goes on with the next; [`Batcher::live`]
//! counts the workers still running, which is what readiness reports.

use crate::metrics::{BatchEvent, BatchObserver};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use inference::{OnnxModel, Prediction};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// What a worker runs a batch on: an ONNX Runtime session, or a stand-in in tests.
pub trait Infer: Send + 'static {
    /// Predictions for `n` images of resized pixels, one per image, in order.
    fn run(&mut self, pixels: Vec<u8>, n: usize) -> Result<Vec<Prediction>, String>;
}

impl Infer for OnnxModel {
    fn run(&mut self, pixels: Vec<u8>, n: usize) -> Result<Vec<Prediction>, String> {
        OnnxModel::run(self, pixels, n).map_err(|e| e.to_string())
    }
}

/// The queue in front of the sessions.
pub struct Batcher {
    tx: Sender<Job>,
    rx: Receiver<Job>,
    live: Arc<AtomicUsize>,
}

/// Counts a worker as live for as long as its thread runs, however it ends.
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Batcher {
    /// Starts one worker thread per session; `observe` hears of every batch run.
    pub fn start<M: Infer>(sessions: Vec<M>, config: BatchConfig, observe: BatchObserver) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(config.max_queue.max(1));
        let live = Arc::new(AtomicUsize::new(0));
        for (i, model) in sessions.into_iter().enumerate() {
            let (rx, observe) = (rx.clone(), observe.clone());
            live.fetch_add(1, Ordering::SeqCst);
            let guard = LiveGuard(live.clone());
            std::thread::Builder::new()
                .name(format!("session-{i}"))
                .spawn(move || {
                    let _guard = guard;
                    worker(model, rx, config, observe)
                })
                .expect("spawning a session thread");
        }
        Self { tx, rx, live }
    }

    /// Workers still running (readiness is false at 0).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
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

/// The text of a panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
}

fn worker<M: Infer>(mut model: M, rx: Receiver<Job>, cfg: BatchConfig, observe: BatchObserver) {
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
        // A panic inside the run fails this batch only; the session is used again for the next.
        let result = match catch_unwind(AssertUnwindSafe(|| model.run(pixels, total))) {
            Ok(Ok(p)) if p.len() == total => Ok(p),
            Ok(Ok(p)) => Err(format!("the session gave {} predictions for {total} images", p.len())),
            Ok(Err(e)) => Err(e),
            Err(panic) => {
                observe(BatchEvent::Panicked);
                Err(format!("the session panicked: {}", panic_message(panic.as_ref())))
            }
        };
        let inference = start.elapsed();
        match &result {
            Ok(_) => observe(BatchEvent::Ran { images: total, time: inference }),
            Err(_) => observe(BatchEvent::Failed),
        }
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
                tracing::error!("a batch of {total} images failed: {e}");
                for j in jobs {
                    let _ = j.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A session that fails in a scripted way on its first calls, then answers.
    struct Scripted(Vec<&'static str>);

    impl Infer for Scripted {
        fn run(&mut self, _pixels: Vec<u8>, n: usize) -> Result<Vec<Prediction>, String> {
            let row = Prediction { logits: vec![1.0, 0.0], probabilities: vec![0.7, 0.3], ood_score: None };
            match self.0.pop() {
                Some("panic") => panic!("scripted panic"),
                Some("error") => Err("scripted ONNX Runtime error".into()),
                Some("short") => Ok(vec![row; n - 1]),
                _ => Ok(vec![row; n]),
            }
        }
    }

    /// Each kind of failure answers its own request with an error that says what happened; the
    /// one worker lives through all of them, answers the next request, and was counted.
    #[tokio::test]
    async fn a_failing_or_panicking_session_fails_its_batch_only() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let observe: BatchObserver = Arc::new(move |e| seen.lock().unwrap().push(e));
        let cfg = BatchConfig { max_batch: 1, max_delay: Duration::ZERO, max_queue: 4 };
        let b = Batcher::start(vec![Scripted(vec!["short", "error", "panic"])], cfg, observe);
        for want in ["panicked: scripted panic", "scripted ONNX Runtime error", "1 predictions for 2 images"] {
            let n = if want.starts_with('1') { 2 } else { 1 };
            match b.submit(vec![0; 12], n).await {
                Err(SubmitError::Failed(e)) => assert!(e.contains(want), "{e}"),
                other => panic!("{want}: {other:?}"),
            }
            assert_eq!(b.live(), 1);
        }
        let ok = b.submit(vec![0; 12], 1).await.unwrap();
        assert_eq!(ok.predictions.len(), 1);
        let events = events.lock().unwrap();
        assert_eq!(events.iter().filter(|e| matches!(e, BatchEvent::Panicked)).count(), 1);
        assert_eq!(events.iter().filter(|e| matches!(e, BatchEvent::Failed)).count(), 3);
        assert_eq!(events.iter().filter(|e| matches!(e, BatchEvent::Ran { .. })).count(), 1);
    }
}
