//! Prometheus metrics of the server: requests and errors by endpoint, latency, batch sizes,
//! queue and inference times, queue length.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    endpoint: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// What the batcher reports about each batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BatchEvent {
    /// A batch of `images` ran in `time` in ONNX Runtime.
    Ran { images: usize, time: Duration },
    /// A batch failed (an ONNX Runtime error, a panic, a wrong number of rows).
    Failed,
    /// A batch's run panicked (also reported as [`BatchEvent::Failed`]).
    Panicked,
}

/// `connections_closed` reason: a new connection, every open one being active.
pub const CLOSED_FULL: &str = "full";
/// `connections_closed` reason: an idle or silent connection, to make room for a new one.
pub const CLOSED_FOR_NEWER: &str = "for_newer";

/// Called by the batcher for every [`BatchEvent`].
pub type BatchObserver = Arc<dyn Fn(BatchEvent) + Send + Sync>;

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    batch_size: Histogram,
    queue: Histogram,
    inference: Histogram,
    queued: Gauge,
    failed_batches: Counter,
    panics: Counter,
    memory_bound: Gauge,
    reloads: Family<ResultLabels, Counter>,
    model_version: Gauge,
    unknown: Family<ReasonLabels, Counter>,
    connections_closed: Family<ClosedLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    port: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("footwear");
        let requests = Family::<RequestLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let latency = Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        let queue = latency_histogram();
        let inference = latency_histogram();
        let queued = Gauge::default();
        let (failed_batches, panics, memory_bound) = (Counter::default(), Counter::default(), Gauge::default());
        registry.register("http_requests", "HTTP requests by endpoint and status", requests.clone());
        registry.register("http_errors", "Error answers by endpoint and error code", errors.clone());
        registry.register("http_request_duration_seconds", "Request latency", latency.clone());
        registry.register("batch_size_images", "Images per inference batch", batch_size.clone());
        registry.register("queue_seconds", "Time a request waited for its batch", queue.clone());
        registry.register("inference_seconds", "ONNX Runtime time per batch", inference.clone());
        registry.register("queued_requests", "Requests waiting for a session", queued.clone());
        registry.register("failed_batches", "Inference batches that failed (error or panic)", failed_batches.clone());
        registry.register("session_panics", "Inference batches whose run panicked", panics.clone());
        registry.register(
            "memory_bound_bytes",
            "Most memory requests can take on top of the loaded model, from the settings",
            memory_bound.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        let model_version = Gauge::default();
        registry.register("model_reloads", "Model reloads by result (ok, refused)", reloads.clone());
        registry.register("model_version", "The version of the model serving", model_version.clone());
        let unknown = Family::<ReasonLabels, Counter>::default();
        // Both reasons from the start, so that a dashboard sees zeros rather than no series.
        for r in [inference::answer::OUT_OF_DISTRIBUTION, inference::answer::LOW_CONFIDENCE] {
            let _ = unknown.get_or_create(&ReasonLabels { reason: r.into() });
        }
        registry.register(
            "unknown_answers",
            "Images answered `unknown` by reason (out_of_distribution: unlike the training photos; \
             low_confidence: below --threshold), on every route",
            unknown.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        for port in ["http", "grpc"] {
            for reason in [CLOSED_FULL, CLOSED_FOR_NEWER] {
                let _ = connections_closed.get_or_create(&ClosedLabels { port: port.into(), reason: reason.into() });
            }
        }
        registry.register(
            "connections_closed",
            "Connections the server closed because their port had --max-connections open, by reason \
             (full: the new one, every open one being active; for_newer: an idle one, for a new one)",
            connections_closed.clone(),
        );
        Self {
            connections_closed,
            unknown,
            reloads,
            model_version,
            registry,
            requests,
            errors,
            latency,
            batch_size,
            queue,
            inference,
            queued,
            failed_batches,
            panics,
            memory_bound,
        }
    }

    /// The counter of connections closed on `port` (`http`, `grpc`) for `reason` ([`CLOSED_FULL`],
    /// [`CLOSED_FOR_NEWER`]), for [`crate::conn::Admission`].
    pub fn connections_closed(&self, port: &str, reason: &str) -> Counter {
        self.connections_closed.get_or_create(&ClosedLabels { port: port.into(), reason: reason.into() }).clone()
    }

    pub fn request(&self, endpoint: &str, status: u16, latency: Duration, error_code: Option<&str>) {
        let endpoint = endpoint.to_string();
        self.requests.get_or_create(&RequestLabels { endpoint: endpoint.clone(), status: status.to_string() }).inc();
        if let Some(code) = error_code {
            self.errors.get_or_create(&ErrorLabels { endpoint: endpoint.clone(), code: code.into() }).inc();
        }
        self.latency.get_or_create(&EndpointLabels { endpoint }).observe(latency.as_secs_f64());
    }

    /// What the batcher reports once per batch: its images and its time in ONNX Runtime, or
    /// its failure.
    pub fn batch_observer(&self) -> BatchObserver {
        let (size, inference) = (self.batch_size.clone(), self.inference.clone());
        let (failed, panics) = (self.failed_batches.clone(), self.panics.clone());
        Arc::new(move |e| match e {
            BatchEvent::Ran { images, time } => {
                size.observe(images as f64);
                inference.observe(time.as_secs_f64());
            }
            BatchEvent::Failed => {
                failed.inc();
            }
            BatchEvent::Panicked => {
                panics.inc();
            }
        })
    }

    /// The reasons of a request's answers (`None`: a class was given).
    pub fn answered(&self, reasons: impl IntoIterator<Item = Option<&'static str>>) {
        for r in reasons.into_iter().flatten() {
            self.unknown.get_or_create(&ReasonLabels { reason: r.into() }).inc();
        }
    }

    /// How long one request waited for its batch.
    pub fn queued_for(&self, queue: Duration) {
        self.queue.observe(queue.as_secs_f64());
    }

    /// A model file was loaded (at start or by a reload).
    pub fn model_loaded(&self, version: &str) {
        self.model_version.set(version.parse().unwrap_or(-1));
    }

    /// A reload ended: swapped in (`ok`) or refused; `version`: the version serving now.
    pub fn reloaded(&self, ok: bool, version: &str) {
        let result = if ok { "ok" } else { "refused" };
        self.reloads.get_or_create(&ResultLabels { result: result.into() }).inc();
        self.model_loaded(version);
    }

    pub fn set_memory_bound(&self, bytes: u64) {
        self.memory_bound.set(bytes as i64);
    }

    pub fn set_queue(&self, n: usize) {
        self.queued.set(n as i64);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("writing to a String");
        s
    }
}
