//! The HTTP server: `POST /v1/predict`, the Open Inference Protocol (KServe v2) REST endpoints,
//! Prometheus `/metrics` and a small web page at `/`. Every error is a JSON body
//! `{"error": "...", "code": "..."}` with a 4xx/5xx status (the v2 protocol's error shape, plus a
//! machine-readable code); no panic reaches a client.

use crate::batcher::{BatchConfig, Batched};
use crate::metrics::Metrics;
use crate::model::{InferError, Loader, Served};
use crate::v2;
use arc_swap::ArcSwap;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use inference::answer::{answer, Answer, OodCheck};
use inference::OnnxModel;
use modelspec::preprocess::{self, ImageError, Source};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub batch: BatchConfig,
    /// Longest a request may wait for its answer (queue + inference).
    pub timeout: Duration,
    /// Longest a client may take between two pieces of a request body.
    pub body_timeout: Duration,
    /// Longest a whole request may take, from its headers to its answer (reading the body,
    /// decoding, queue, inference).
    pub request_timeout: Duration,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// What one image may cost to decode (sizes, metadata, allocations).
    pub limits: preprocess::DecodeLimits,
    /// Required `Authorization: Bearer` token, if any (health and the page stay open).
    pub token: Option<String>,
    /// Most images in one request (multipart parts, or N of a v2 tensor).
    pub max_images: usize,
    /// Most inference requests admitted at once (reading their body, decoding, queued or
    /// running); one more is answered 503 with `Retry-After` without being decoded.
    pub max_inflight: usize,
    /// Most images decoded at once (each may take `limits.peak_bytes(size)`).
    pub max_decodes: usize,
    pub top_k: usize,
    pub threshold: f32,
    /// Answer `unknown` for images beyond the file's out-of-distribution threshold (files
    /// with the `ood_score` output); off: as a file without it.
    pub ood: bool,
    /// Origins allowed to call the server from a browser (CORS); `*`: any; none: CORS off.
    pub cors_origins: Vec<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            batch: BatchConfig::default(),
            timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_body_bytes: 16 << 20,
            limits: preprocess::DecodeLimits::default(),
            token: None,
            max_images: Self::DEFAULT_MAX_IMAGES,
            max_inflight: Self::DEFAULT_MAX_INFLIGHT,
            max_decodes: std::thread::available_parallelism().map_or(2, |n| n.get()),
            top_k: 3,
            threshold: 0.0,
            ood: true,
            cors_origins: Vec::new(),
        }
    }
}

impl ServeConfig {
    pub const DEFAULT_MAX_IMAGES: usize = 16;
    pub const DEFAULT_MAX_INFLIGHT: usize = 32;

    /// The most memory requests can take on top of the loaded model, for a `size` px model
    /// (docs/reliability.md): the bodies of the admitted requests, the decodes running, the
    /// pixels queued for a session.
    pub fn memory_bound_bytes(&self, size: usize) -> u64 {
        let bodies = self.max_inflight as u64 * self.max_body_bytes as u64;
        let decodes = self.max_decodes as u64 * self.limits.peak_bytes(size as u32);
        let queued = (self.batch.max_queue * self.max_images * size * size * 3) as u64;
        bodies + decodes + queued
    }
}

/// What the handlers (HTTP and gRPC) share.
pub struct AppState {
    /// The model serving now; a reload swaps it.
    model: ArcSwap<Served>,
    reloader: Reloader,
    pub(crate) cfg: ServeConfig,
    pub(crate) metrics: Metrics,
    /// Permits of the inference requests admitted ([`ServeConfig::max_inflight`]).
    pub(crate) inflight: Arc<Semaphore>,
    /// Permits of the decodes running ([`ServeConfig::max_decodes`]).
    decodes: Arc<Semaphore>,
}

/// Why a reload did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadError {
    /// Another reload is running (a request does not queue behind it).
    Busy,
    /// The file failed a step; the old model keeps serving.
    Refused(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Busy => f.write_str("a reload is already running; ask again once it has finished"),
            Self::Refused(e) => f.write_str(e),
        }
    }
}

/// How a reload gets the new model: the file it reads, how to load its sessions, and one
/// reload at a time.
struct Reloader {
    file: PathBuf,
    loader: Loader,
    busy: tokio::sync::Mutex<()>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        self.status
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// 503 with `Retry-After`: the server is full, the request was not started.
    pub(crate) fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
    }
    pub(crate) fn too_many_images(n: usize, max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_images",
            format!("{n} images in one request; at most {max} (--max-images)"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(json!({"error": self.message, "code": self.code}))).into_response();
        if self.code == "overloaded" {
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r.extensions_mut().insert(ErrorCode(self.code));
        r
    }
}

/// The error code of a response, for the error counter.
#[derive(Clone, Copy)]
struct ErrorCode(&'static str);

fn image_error(part: &str, e: ImageError) -> ApiError {
    match e {
        ImageError::TooLarge { .. } | ImageError::Metadata { .. } | ImageError::OverBudget { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", format!("{part}: {e}"))
        }
        _ => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_image", format!("{part}: {e}")),
    }
}

pub(crate) fn body_error(status: StatusCode, e: impl std::fmt::Display, limit: usize) -> ApiError {
    let msg = e.to_string();
    // tower-http's body timeout, as the extractors word it.
    if msg.contains("designated timeout") || msg.contains("timed out") {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", format!("the request body stopped arriving: {msg}"))
    } else if status == StatusCode::PAYLOAD_TOO_LARGE || msg.contains("length limit") {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body over the limit of {limit} bytes"),
        )
    } else {
        ApiError::bad_request("bad_body", format!("cannot read the request body: {msg}"))
    }
}

impl AppState {
    /// The state of a server of `model`, reloaded from `file` through `loader`.
    pub fn new(model: Served, file: PathBuf, loader: Loader, cfg: ServeConfig, metrics: Metrics) -> Arc<Self> {
        let (inflight, decodes) =
            (Arc::new(Semaphore::new(cfg.max_inflight)), Arc::new(Semaphore::new(cfg.max_decodes)));
        metrics.model_loaded(&model.version);
        Arc::new(Self {
            model: ArcSwap::from_pointee(model),
            reloader: Reloader { file, loader, busy: tokio::sync::Mutex::new(()) },
            cfg,
            metrics,
            inflight,
            decodes,
        })
    }

    /// The server's Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The model serving now. A request takes it once and keeps it to the end, so that a reload
    /// in between does not mix two models in one answer.
    pub fn current(&self) -> Arc<Served> {
        self.model.load_full()
    }

    /// Zero-downtime reload: loads the model file again (the operator has replaced it), checks
    /// its metadata, warms every session up, and only then swaps it in; requests in flight
    /// finish on the old model, whose sessions stop when the last of them is done. A file that
    /// fails any step leaves the old model serving, and the error says why. One reload at a
    /// time: `wait` (SIGHUP) waits for one that is running, else ([`ReloadError::Busy`]) a
    /// request for another is refused; the model's name may not change (clients address it by
    /// name).
    pub async fn reload(&self, wait: bool) -> Result<Arc<Served>, ReloadError> {
        let _one = if wait {
            self.reloader.busy.lock().await
        } else {
            self.reloader.busy.try_lock().map_err(|_| ReloadError::Busy)?
        };
        let t0 = Instant::now();
        let old = self.current();
        let (file, loader) = (self.reloader.file.clone(), self.reloader.loader.clone());
        let (batch, observe, ood) = (self.cfg.batch, self.metrics.batch_observer(), self.cfg.ood);
        let loaded = tokio::task::spawn_blocking(move || {
            let sessions = loader(&file)?;
            Served::start(sessions, &file, batch, observe, ood)
        })
        .await
        .map_err(|e| format!("reload: {e}"))
        .and_then(|r| r.map_err(|e| format!("{e:#}")))
        .and_then(|new| {
            if new.name == old.name {
                Ok(new)
            } else {
                Err(format!(
                    "{}: the new file's model is `{}`, not `{}`; a server keeps its model's name",
                    new.file.display(),
                    new.name,
                    old.name
                ))
            }
        });
        match loaded {
            Ok(new) => {
                let new = Arc::new(new);
                self.model.store(new.clone());
                self.metrics.reloaded(true, &new.version);
                tracing::info!(
                    "reloaded {}: model `{}` version {} -> {} ({}), warm, serving; took {:.0} ms",
                    new.file.display(),
                    new.name,
                    old.version,
                    new.version,
                    new.precision,
                    t0.elapsed().as_secs_f64() * 1e3
                );
                Ok(new)
            }
            Err(e) => {
                self.metrics.reloaded(false, &old.version);
                tracing::error!("reload refused, version {} keeps serving: {e}", old.version);
                Err(ReloadError::Refused(format!("reload refused, version {} keeps serving: {e}", old.version)))
            }
        }
    }

    /// Decodes and resizes images off the async threads for model `m`; the first image that
    /// cannot be read fails the request, naming its part.
    async fn to_pixels(&self, m: &Served, parts: Vec<(String, Bytes)>) -> Result<(Vec<String>, Vec<u8>), ApiError> {
        let (size, max) = (m.size as u32, self.cfg.limits);
        let mut pixels = Vec::with_capacity(parts.len() * (size * size * 3) as usize);
        let mut names = Vec::with_capacity(parts.len());
        for (name, bytes) in parts {
            // A decode slot per image, not per request: decodes, not requests, are what take
            // memory and cores, and the slots are handed out in turn (tokio's semaphore is
            // fair), so a photo sent while a request of 16 large images decodes waits for one
            // image, not sixteen. The permit goes with the decoding thread (which a timed-out
            // request cannot stop).
            let permit =
                self.decodes.clone().acquire_owned().await.map_err(|_| ApiError::overloaded("shutting down"))?;
            let prep = m.preprocessing.clone();
            let mut one = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                preprocess::decode_batch(&[Source::Bytes(&bytes)], size, &prep, &max)
            })
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("decoding failed: {e}"))
            })?;
            if let Some((_, e)) = one.failed.pop() {
                return Err(image_error(&name, e));
            }
            pixels.extend_from_slice(&one.pixels);
            names.push(name);
        }
        Ok((names, pixels))
    }

    /// Runs `n` images of `pixels` on model `m` (`started`: when the request began).
    pub(crate) async fn infer(
        &self,
        m: &Served,
        pixels: Vec<u8>,
        n: usize,
        started: Instant,
    ) -> Result<Batched, ApiError> {
        let b = m.infer(pixels, n, self.cfg.timeout, started).await.map_err(|e| match e {
            InferError::Timeout(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", e.to_string()),
            InferError::QueueFull(_) => ApiError::overloaded(e.to_string()),
            InferError::Failed(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "inference_failed", e.to_string())
            }
        })?;
        self.metrics.queued_for(b.queue);
        Ok(b)
    }
}

#[derive(Debug, Deserialize)]
struct PredictQuery {
    top_k: Option<usize>,
    threshold: Option<f32>,
}

#[derive(Serialize)]
struct NamedAnswer {
    file: String,
    #[serde(flatten)]
    answer: Answer,
}

const IMAGE_TYPES: &str =
    "image/jpeg, image/png, image/webp, application/octet-stream, multipart/form-data or application/json (base64)";

/// One image of a JSON body: base64, or an object naming it.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonImage<'a> {
    Base64(#[serde(borrow)] Cow<'a, str>),
    Named {
        name: Option<String>,
        #[serde(borrow)]
        b64: Cow<'a, str>,
    },
}

/// A JSON body of `/v1/predict`: `{"image": "<base64>"}` or `{"images": ["<base64>" | {"name":
/// "a.jpg", "b64": "<base64>"}, ...]}`; base64 may be a `data:image/...;base64,` URL.
/// The base64 strings are borrowed from the body where they can be (no escapes), so that a
/// body is not held twice while it is decoded. Read by [`JsonImagesSeed`], which stops at the
/// first element of `images` past `--max-images` (a list of millions of tiny entries is not
/// built first and counted after).
#[derive(Default)]
struct JsonImages<'a> {
    image: Option<Cow<'a, str>>,
    images: Option<Vec<JsonImage<'a>>>,
}

/// Reads a [`JsonImages`] with at most `max` images; `capped` says that reading stopped there.
struct JsonImagesSeed<'c> {
    max: usize,
    capped: &'c std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for JsonImagesSeed<'_> {
    type Value = JsonImages<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonImagesSeed<'_> {
    type Value = JsonImages<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object with `image` or `images`")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let mut out = JsonImages::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "image" if out.image.is_none() => out.image = Some(map.next_value::<BorrowedStr<'de>>()?.0),
                "images" if out.images.is_none() => {
                    out.images = Some(map.next_value_seed(CappedList { max: self.max, capped: self.capped })?)
                }
                "image" | "images" => return Err(A::Error::custom(format!("duplicate field `{key}`"))),
                other => return Err(A::Error::unknown_field(other, &["image", "images"])),
            }
        }
        Ok(out)
    }
}

/// A string borrowed from the body where it can be.
struct BorrowedStr<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for BorrowedStr<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct B<'a>(#[serde(borrow)] Cow<'a, str>);
        B::deserialize(d).map(|b| BorrowedStr(b.0))
    }
}

/// The `images` list, refused at its `max + 1`-th element.
struct CappedList<'c> {
    max: usize,
    capped: &'c std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for CappedList<'_> {
    type Value = Vec<JsonImage<'de>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for CappedList<'_> {
    type Value = Vec<JsonImage<'de>>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of base64 strings or {\"name\", \"b64\"} objects")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(im) = seq.next_element::<JsonImage<'de>>()? {
            if out.len() == self.max {
                self.capped.set(true);
                return Err(serde::de::Error::custom("too many images"));
            }
            out.push(im);
        }
        Ok(out)
    }
}

/// The images of a JSON body, each decoded from base64 (an error names the field).
fn json_images(body: &[u8], max_images: usize) -> Result<Vec<(String, Bytes)>, ApiError> {
    use base64::Engine;
    use serde::de::DeserializeSeed;
    let capped = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let req = JsonImagesSeed { max: max_images, capped: &capped }.deserialize(&mut de).and_then(|r| {
        de.end()?;
        Ok(r)
    });
    let req = match req {
        Ok(r) => r,
        Err(_) if capped.get() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_images",
                format!("more than {max_images} images in one request; at most {max_images} (--max-images)"),
            ))
        }
        Err(e) => {
            return Err(ApiError::bad_request(
                "malformed_json",
                format!("JSON body: {e}; send {{\"image\": \"<base64>\"}} or {{\"images\": [...]}}"),
            ))
        }
    };
    let list: Vec<(String, Cow<str>)> = match (req.image, req.images) {
        (Some(one), None) => vec![("image".into(), one)],
        (None, Some(many)) => many
            .into_iter()
            .enumerate()
            .map(|(i, im)| match im {
                JsonImage::Base64(b) => (format!("images[{i}]"), b),
                JsonImage::Named { name, b64 } => (name.unwrap_or_else(|| format!("images[{i}]")), b64),
            })
            .collect(),
        _ => return Err(ApiError::bad_request("no_image", "the JSON body needs exactly one of `image` and `images`")),
    };
    if list.is_empty() {
        return Err(ApiError::bad_request("no_image", "`images` is empty"));
    }
    if list.len() > max_images {
        return Err(ApiError::too_many_images(list.len(), max_images));
    }
    list.into_iter()
        .map(|(name, b64)| {
            let data = match b64.strip_prefix("data:") {
                Some(url) => url.split_once(";base64,").map(|(_, d)| d).ok_or_else(|| {
                    ApiError::bad_request("bad_base64", format!("{name}: a data: URL without `;base64,`"))
                })?,
                None => &b64[..],
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| ApiError::bad_request("bad_base64", format!("{name}: not base64: {e}")))?;
            Ok((name, Bytes::from(bytes)))
        })
        .collect()
}

/// `POST /v1/predict`: the image as the body, one or several images as multipart parts, or
/// JSON with base64 images.
async fn predict(
    State(s): State<Arc<AppState>>,
    q: Result<Query<PredictQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Json<Value>, ApiError> {
    let t0 = Instant::now();
    let Query(q) = q.map_err(|e| ApiError::bad_request("bad_query", format!("query string: {}", e.body_text())))?;
    let ctype = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mime = ctype.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let limit = s.cfg.max_body_bytes;
    let parts: Vec<(String, Bytes)> = if mime == "multipart/form-data" {
        let mut mp = Multipart::from_request(req, &()).await.map_err(|e| body_error(e.status(), e, limit))?;
        let mut parts = Vec::new();
        let mut count = 0;
        while let Some(mut field) = mp.next_field().await.map_err(|e| body_error(e.status(), e, limit))? {
            count += 1;
            // Parts over the limit are read and dropped (not kept): answering before the client
            // has sent its body would reset the connection under its feet.
            if count > s.cfg.max_images {
                while field.chunk().await.map_err(|e| body_error(e.status(), e, limit))?.is_some() {}
                continue;
            }
            let name = field
                .file_name()
                .or(field.name())
                .map(str::to_string)
                .unwrap_or_else(|| format!("part {}", parts.len() + 1));
            let bytes = field.bytes().await.map_err(|e| body_error(e.status(), e, limit))?;
            parts.push((name, bytes));
        }
        if count > s.cfg.max_images {
            return Err(ApiError::too_many_images(count, s.cfg.max_images));
        }
        if parts.is_empty() {
            return Err(ApiError::bad_request("no_image", "the multipart body has no parts; send one image per part"));
        }
        parts
    } else if mime == "application/json" {
        let bytes = Bytes::from_request(req, &()).await.map_err(|e| body_error(e.status(), e, limit))?;
        json_images(&bytes, s.cfg.max_images)?
    } else if mime.is_empty() || mime.starts_with("image/") || mime == "application/octet-stream" {
        let bytes = Bytes::from_request(req, &()).await.map_err(|e| body_error(e.status(), e, limit))?;
        vec![("body".to_string(), bytes)]
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_type",
            format!("content type `{ctype}` is not an image; send {IMAGE_TYPES}"),
        ));
    };
    let m = s.current();
    let (names, pixels) = s.to_pixels(&m, parts).await?;
    let decoded = t0.elapsed();
    let n = names.len();
    let b = s.infer(&m, pixels, n, t0).await?;
    let (k, threshold) = (q.top_k.unwrap_or(s.cfg.top_k), q.threshold.unwrap_or(s.cfg.threshold));
    let answers: Vec<NamedAnswer> = names
        .into_iter()
        .zip(&b.predictions)
        .map(|(file, p)| {
            let ood = OodCheck::of(p.ood_score, m.ood.as_ref(), true);
            NamedAnswer { file, answer: answer(&p.probabilities, &m.classes, k, threshold, ood) }
        })
        .collect();
    s.metrics.answered(answers.iter().map(|a| a.answer.reason));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut body = json!({
        "model": {"name": m.name, "version": m.version},
        "timings_ms": {"decode": ms(decoded), "queue": ms(b.queue), "inference": ms(b.inference), "total": ms(t0.elapsed())},
        "batch_size": b.batch_size,
    });
    if let [one] = answers.as_slice() {
        body["label"] = json!(one.answer.label);
        body["confidence"] = json!(one.answer.confidence);
        body["top_k"] = json!(one.answer.top_k);
        for (k, v) in [
            ("reason", json!(one.answer.reason)),
            ("ood_score", json!(one.answer.ood_score)),
            ("ood_threshold", json!(one.answer.ood_threshold)),
        ] {
            if !v.is_null() {
                body[k] = v;
            }
        }
    }
    body["predictions"] = json!(answers);
    Ok(Json(body))
}

async fn metrics_page(State(s): State<Arc<AppState>>) -> Response {
    s.metrics.set_queue(s.current().batcher.queued());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.encode()).into_response()
}

async fn page(State(s): State<Arc<AppState>>) -> Html<String> {
    let name = s.current().name.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let classes = inference::answer::class_list(&s.current().classes);
    let classes = classes.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    Html(include_str!("../web/index.html").replace("{{MODEL}}", &name).replace("{{CLASSES}}", &classes))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see / for the page, /v1/predict, /v2/...")
}

/// The route a path belongs to, as a metrics label (model names folded, unknown paths `other`,
/// so that clients cannot grow the label set).
fn endpoint_label(path: &str) -> String {
    const FIXED: [&str; 9] = [
        "/",
        "/v1/predict",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/metrics",
        "/openapi.json",
        "/v2/models/stats",
        "/v2/repository/index",
    ];
    if let Some(f) = FIXED.iter().find(|f| **f == path) {
        return f.to_string();
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v2", "models", _] => "/v2/models/{name}",
        ["v2", "models", _, "ready"] => "/v2/models/{name}/ready",
        ["v2", "models", _, "infer"] => "/v2/models/{name}/infer",
        ["v2", "models", _, "config"] => "/v2/models/{name}/config",
        ["v2", "models", _, "stats"] => "/v2/models/{name}/stats",
        ["v2", "models", _, "versions", _] => "/v2/models/{name}/versions/{version}",
        ["v2", "models", _, "versions", _, "ready"] => "/v2/models/{name}/versions/{version}/ready",
        ["v2", "models", _, "versions", _, "infer"] => "/v2/models/{name}/versions/{version}/infer",
        ["v2", "models", _, "versions", _, "config"] => "/v2/models/{name}/versions/{version}/config",
        ["v2", "models", _, "versions", _, "stats"] => "/v2/models/{name}/versions/{version}/stats",
        ["v2", "repository", "models", _, "load"] => "/v2/repository/models/{name}/load",
        ["v2", "repository", "models", _, "unload"] => "/v2/repository/models/{name}/unload",
        _ => "other",
    }
    .to_string()
}

/// Counts every request by endpoint and status, with its latency.
async fn observe(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = endpoint_label(req.uri().path());
    let t0 = Instant::now();
    let r = next.run(req).await;
    let code = r.extensions().get::<ErrorCode>().map(|c| c.0);
    s.metrics.request(&endpoint, r.status().as_u16(), t0.elapsed(), code);
    r
}

/// Most of an oversized body read (and dropped) before the 413 goes out, and for how long.
const DRAIN_BYTES: u64 = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// A body that declares more than the limit is answered 413 without running a handler, after the server
/// has read (and dropped) what the client sends, up to [`DRAIN_BYTES`] or [`DRAIN_TIME`]: a
/// server that answers and closes while the client is still sending resets the connection, and
/// the client sees a broken pipe instead of the 413 (seen with 8 MiB bodies against a 1 MiB
/// limit). Bodies without a declared length meet the extractors' limit instead.
async fn reject_oversized(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let limit = s.cfg.max_body_bytes;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_none_or(|n| n <= limit as u64) {
        return next.run(req).await;
    }
    drain(req.into_body(), DRAIN_BYTES, DRAIN_TIME).await;
    body_error(StatusCode::PAYLOAD_TOO_LARGE, "", limit).into_response()
}

/// The whole request within [`ServeConfig::request_timeout`], else 408 (a client that sends its
/// body too slowly, however steadily, cannot hold a connection and a permit forever).
async fn limit_time(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let limit = s.cfg.request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request took longer than {limit:?} (--request-timeout-s)"),
        )
        .into_response(),
    }
}

/// Whether a path needs the token: inference, model metadata, statistics and the repository
/// (reload) do; the page, health, server metadata, metrics, the OpenAPI description and unknown
/// paths do not.
fn protected(path: &str) -> bool {
    path.starts_with("/v1/") || path.starts_with("/v2/models/") || path.starts_with("/v2/repository/")
}

/// The bearer token, when one is set, checked before anything reads the body (an unknown client
/// cannot make the server read or drain one), in constant time.
async fn authorize(State(s): State<Arc<AppState>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(token) = s.cfg.token.as_deref().filter(|_| protected(req.uri().path())) {
        let given =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong `Authorization: Bearer` token",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Admits an inference request if fewer than `max_inflight` are in the server, else answers 503
/// with `Retry-After` without decoding it; the permit lives as long as the request.
async fn admit(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match s.inflight.clone().try_acquire_owned() {
        Ok(_permit) => next.run(req).await,
        Err(_) => {
            // The body is read and dropped (within the body limit, for at most SHED_DRAIN_TIME)
            // so that a client still sending hears the 503 and its Retry-After, not a reset.
            drain(req.into_body(), s.cfg.max_body_bytes as u64, SHED_DRAIN_TIME).await;
            ApiError::overloaded(format!(
                "{} requests are already being served (--max-inflight); retry later",
                s.cfg.max_inflight
            ))
            .into_response()
        }
    }
}

/// How long a shed request's body is drained at most.
const SHED_DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads and drops up to `max` bytes of `body`, for at most `time`.
async fn drain(body: axum::body::Body, max: u64, time: Duration) {
    use http_body_util::BodyExt;
    let mut body = body;
    let deadline = tokio::time::Instant::now() + time;
    let mut drained = 0u64;
    while drained <= max {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => drained += frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => break,
        }
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; the server keeps serving")
        .into_response()
}

/// Loads nothing: checks and warms up `sessions` (of `file`) and builds the server's state;
/// `loader` loads the file again on a reload.
pub fn state(
    sessions: Vec<OnnxModel>,
    file: PathBuf,
    loader: Loader,
    cfg: ServeConfig,
) -> anyhow::Result<Arc<AppState>> {
    let metrics = Metrics::new();
    let model = Served::start(sessions, &file, cfg.batch, metrics.batch_observer(), cfg.ood)?;
    let bound = cfg.memory_bound_bytes(model.size);
    metrics.set_memory_bound(bound);
    tracing::info!("requests may take at most {} MiB on top of the loaded model (docs/reliability.md)", bound >> 20);
    Ok(AppState::new(model, file, loader, cfg, metrics))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("../web/openapi.json")).into_response()
}

/// CORS for the origins given (`*`: any), off when none is.
fn cors(origins: &[String]) -> anyhow::Result<Option<tower_http::cors::CorsLayer>> {
    use axum::http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o.trim_end_matches('/'))
                    .map_err(|_| anyhow::anyhow!("--cors-origin {o:?} is not a valid origin"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    let binary = HeaderName::from_static(v2::HEADER_LENGTH);
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, binary.clone()])
            .expose_headers([binary, header::RETRY_AFTER])
            .max_age(Duration::from_secs(600)),
    ))
}

/// The application: routes, limits, auth, metrics, CORS, panic guard.
pub fn app(state: Arc<AppState>) -> anyhow::Result<Router> {
    let inference = Router::new()
        .route("/v1/predict", post(predict))
        .route("/v2/models/{name}/infer", post(v2::infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(v2::infer))
        .route_layer(middleware::from_fn_with_state(state.clone(), admit));
    let protected = Router::new()
        .route("/v2/models/stats", get(v2::stats))
        .route("/v2/models/{name}", get(v2::model))
        .route("/v2/models/{name}/versions/{version}", get(v2::model))
        .route("/v2/models/{name}/ready", get(v2::model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(v2::model_ready))
        .route("/v2/models/{name}/config", get(v2::model_config))
        .route("/v2/models/{name}/versions/{version}/config", get(v2::model_config))
        .route("/v2/models/{name}/stats", get(v2::stats))
        .route("/v2/models/{name}/versions/{version}/stats", get(v2::stats))
        .route("/v2/repository/index", post(v2::repository_index))
        .route("/v2/repository/models/{name}/load", post(v2::repository_load))
        .route("/v2/repository/models/{name}/unload", post(v2::repository_unload))
        .merge(inference);
    let router = Router::new()
        .route("/", get(page))
        .route("/openapi.json", get(openapi))
        .route("/v2", get(v2::server_metadata))
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready))
        .route("/metrics", get(metrics_page))
        .merge(protected)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), reject_oversized))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(state.cfg.body_timeout))
        .layer(middleware::from_fn_with_state(state.clone(), limit_time))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes));
    // Outside authorization: a browser's preflight carries no token.
    let router = match cors(&state.cfg.cors_origins)? {
        Some(layer) => router.layer(layer),
        None => router,
    };
    Ok(router.layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response)).with_state(state))
}

/// Connection settings of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct ConnConfig {
    /// Longest a client may take to send a request's headers (a slow client holding a
    /// connection open without a request is closed).
    pub header_timeout: Duration,
    /// After the shutdown signal: longest the requests in flight may take to finish before their
    /// connections are closed.
    pub shutdown_deadline: Duration,
}

impl Default for ConnConfig {
    fn default() -> Self {
        Self { header_timeout: Duration::from_secs(10), shutdown_deadline: Duration::from_secs(60) }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and lets the
/// requests in flight finish (each ends within the request timeout), closing whatever is left
/// after `conn.shutdown_deadline`. HTTP/1.1 over hyper, with a header read timeout; over TLS
/// when `tls` is given (the handshake, too, within the header timeout). Connections are admitted
/// by `admission` (a cap on those open, deadlines for silent and idle ones: [`crate::conn`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    conn: ConnConfig,
    admission: crate::conn::Admission,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            // Accept errors (out of file descriptors and the like) are waited out there.
            stream = crate::conn::accept(&listener, &admission) => stream,
            _ = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let builder = {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(conn.header_timeout);
            b
        };
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let r = match tls {
                None => watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await,
                Some(acceptor) => match tokio::time::timeout(conn.header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await,
                    Ok(Err(e)) => {
                        tracing::debug!("TLS handshake: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake: no handshake within {:?}", conn.header_timeout);
                        return;
                    }
                },
            };
            if let Err(e) = r {
                tracing::debug!("connection: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(conn.shutdown_deadline, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still running {:?} after the shutdown signal: closing them", conn.shutdown_deadline);
    }
    Ok(())
}

/// A TLS server configuration (rustls) from PEM files: the certificate chain and its private key.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("--tls-cert {}: reading PEM certificates", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("--tls-cert {}: no certificate in the file", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("--tls-key {}: reading a PEM private key", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("--tls-cert and --tls-key do not make a usable certificate and key")?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<Vec<(String, Bytes)>, ApiError>) -> &'static str {
        r.err().map(|e| e.code).unwrap_or("ok")
    }

    /// The `/v1/predict` JSON reader: what it takes, and a list of millions of entries refused at
    /// the first one past the limit.
    #[test]
    fn json_images_are_read_and_refused_at_the_first_image_past_the_limit() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(b"not really a jpeg");
        let ok = json_images(format!(r#"{{"image": "{b64}"}}"#).as_bytes(), 16).unwrap();
        assert_eq!((ok[0].0.as_str(), &ok[0].1[..]), ("image", &b"not really a jpeg"[..]));
        let body = format!(r#"{{"images": ["{b64}", {{"name": "a.jpg", "b64": "data:image/jpeg;base64,{b64}"}}]}}"#);
        let two = json_images(body.as_bytes(), 16).unwrap();
        assert_eq!((two[0].0.as_str(), two[1].0.as_str()), ("images[0]", "a.jpg"));
        assert_eq!(code(json_images(br#"{"images": ["a", "b", "c"]}"#, 2)), "too_many_images");
        assert_eq!(code(json_images(br#"{"image": "QQ==", "extra": 1}"#, 2)), "malformed_json");
        assert_eq!(code(json_images(br#"{"image": "QQ==", "image": "QQ=="}"#, 2)), "malformed_json");
        assert_eq!(code(json_images(br#"{"image": "QQ=="} trailing"#, 2)), "malformed_json");
        assert_eq!(code(json_images(br#"{"images": []}"#, 2)), "no_image");
        assert_eq!(code(json_images(br#"{}"#, 2)), "no_image");
        // 5.6 million empty strings (11 MB): refused at the 17th.
        let mut huge = String::from(r#"{"images": ["#);
        huge.push_str(&r#""","#.repeat(5_600_000));
        huge.push_str(r#""""]}"#);
        let e = json_images(huge.as_bytes(), 16).err().unwrap();
        // "More than": it stopped there, without building (and counting) the whole list.
        assert_eq!(
            (e.code, e.message.as_str()),
            ("too_many_images", "more than 16 images in one request; at most 16 (--max-images)")
        );
    }
}
