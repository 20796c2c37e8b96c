//! The HTTP server: `POST /v1/predict`, the Open Inference Protocol (KServe v2) REST endpoints,
//! Prometheus `/metrics` and a small web page at `/`. Every error is a JSON body
//! `{"error": "...", "code": "..."}` with a 4xx/5xx status (the v2 protocol's error shape, plus a
//! machine-readable code); no panic reaches a client.

use crate::batcher::{BatchConfig, Batched, Batcher, SubmitError};
use crate::metrics::Metrics;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use inference::answer::{answer, Answer};
use inference::OnnxModel;
use modelspec::onnx_meta::{INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME};
use modelspec::preprocess::{self, ImageError, Source};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
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

/// What the handlers share.
pub struct AppState {
    batcher: Batcher,
    name: String,
    version: String,
    classes: Vec<String>,
    size: usize,
    preprocessing: modelspec::Preprocessing,
    cfg: ServeConfig,
    metrics: Metrics,
    /// Permits of the inference requests admitted ([`ServeConfig::max_inflight`]).
    inflight: Arc<Semaphore>,
    /// Permits of the decodes running ([`ServeConfig::max_decodes`]).
    decodes: Arc<Semaphore>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// 503 with `Retry-After`: the server is full, the request was not started.
    fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
    }
    fn too_many_images(n: usize, max: usize) -> Self {
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

fn body_error(status: StatusCode, e: impl std::fmt::Display, limit: usize) -> ApiError {
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
    /// Decodes and resizes images off the async threads; the first image that cannot be read
    /// fails the request, naming its part.
    async fn to_pixels(&self, parts: Vec<(String, Bytes)>) -> Result<(Vec<String>, Vec<u8>), ApiError> {
        let (size, prep, max) = (self.size as u32, self.preprocessing.clone(), self.cfg.limits);
        // Waits for a decode slot: decodes, not requests, are what take memory and cores. The
        // permit goes with the decoding thread (which a timed-out request cannot stop), and its
        // images are decoded one after another, so that a permit is one decode at a time.
        let permit = self.decodes.clone().acquire_owned().await.map_err(|_| ApiError::overloaded("shutting down"))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut pixels = Vec::with_capacity(parts.len() * (size * size * 3) as usize);
            for (name, bytes) in &parts {
                let mut one = preprocess::decode_batch(&[Source::Bytes(bytes)], size, &prep, &max);
                if let Some((_, e)) = one.failed.pop() {
                    return Err(image_error(name, e));
                }
                pixels.extend_from_slice(&one.pixels);
            }
            Ok((parts.into_iter().map(|(name, _)| name).collect(), pixels))
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("decoding failed: {e}")))?
    }

    async fn infer(&self, pixels: Vec<u8>, n: usize) -> Result<Batched, ApiError> {
        let b = tokio::time::timeout(self.cfg.timeout, self.batcher.submit(pixels, n))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    format!("no answer within {:?}; the server is overloaded, retry later", self.cfg.timeout),
                )
            })?
            .map_err(|e| match e {
                SubmitError::QueueFull(_) => ApiError::overloaded(format!("{e}; retry later")),
                e => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "inference_failed", e.to_string()),
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

const IMAGE_TYPES: &str = "image/jpeg, image/png, image/webp, application/octet-stream or multipart/form-data";

/// `POST /v1/predict`: the image as the body, or one or several images as multipart parts.
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
    let (names, pixels) = s.to_pixels(parts).await?;
    let decoded = t0.elapsed();
    let n = names.len();
    let b = s.infer(pixels, n).await?;
    let (k, threshold) = (q.top_k.unwrap_or(s.cfg.top_k), q.threshold.unwrap_or(s.cfg.threshold));
    let answers: Vec<NamedAnswer> = names
        .into_iter()
        .zip(&b.predictions)
        .map(|(file, p)| NamedAnswer { file, answer: answer(&p.probabilities, &s.classes, k, threshold) })
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut body = json!({
        "model": {"name": s.name, "version": s.version},
        "timings_ms": {"decode": ms(decoded), "queue": ms(b.queue), "inference": ms(b.inference), "total": ms(t0.elapsed())},
        "batch_size": b.batch_size,
    });
    if let [one] = answers.as_slice() {
        body["label"] = json!(one.answer.label);
        body["confidence"] = json!(one.answer.confidence);
        body["top_k"] = json!(one.answer.top_k);
    }
    body["predictions"] = json!(answers);
    Ok(Json(body))
}

fn check_model(s: &AppState, name: &str) -> Result<(), ApiError> {
    if name == s.name {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_model",
            format!("model `{name}` not found; this server serves `{}`", s.name),
        ))
    }
}

async fn v2_server() -> Json<Value> {
    Json(json!({"name": "footwear-runtime", "version": env!("CARGO_PKG_VERSION"), "extensions": []}))
}

async fn v2_live() -> Json<Value> {
    Json(json!({"live": true}))
}

/// Ready while at least one session worker runs.
async fn v2_ready(State(s): State<Arc<AppState>>) -> Response {
    let live = s.batcher.live();
    let status = if live > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"ready": live > 0, "live_sessions": live}))).into_response()
}

async fn v2_model(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    check_model(&s, &name)?;
    let (n, c) = (s.size as i64, s.classes.len());
    Ok(Json(json!({
        "name": s.name,
        "versions": [s.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, n, n, 3]}],
        "outputs": [
            {"name": LOGITS_NAME, "datatype": "FP32", "shape": [-1, c]},
            {"name": PROBABILITIES_NAME, "datatype": "FP32", "shape": [-1, c]},
        ],
        "parameters": {"classes": s.classes},
    })))
}

async fn v2_model_ready(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    check_model(&s, &name)?;
    Ok(Json(json!({"name": s.name, "ready": s.batcher.live() > 0})))
}

#[derive(Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Deserialize)]
struct InferOutputRequest {
    name: String,
}

#[derive(Deserialize)]
struct InferRequest {
    id: Option<String>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Option<Vec<InferOutputRequest>>,
}

/// Flattens a (possibly nested) JSON array of numbers into pixel bytes.
fn flatten_pixels(v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    match v {
        Value::Array(a) => a.iter().try_for_each(|x| flatten_pixels(x, out)),
        Value::Number(n) => match n
            .as_u64()
            .filter(|&x| x <= 255)
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && (0.0..=255.0).contains(f)).map(|f| f as u64))
        {
            Some(x) => {
                out.push(x as u8);
                Ok(())
            }
            None => Err(format!("{n} is not a UINT8 value (0-255)")),
        },
        other => Err(format!("{other} is not a number")),
    }
}

/// `POST /v2/models/{name}/infer` (Open Inference Protocol, JSON tensors).
async fn v2_infer(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    check_model(&s, &name)?;
    let body = body.map_err(|e| body_error(e.status(), e, s.cfg.max_body_bytes))?;
    let req: InferRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("inference request: {e}")))?;
    let [input] = req.inputs.as_slice() else {
        return Err(ApiError::bad_request(
            "bad_inputs",
            format!("expected exactly one input `{INPUT_NAME}`, got {}", req.inputs.len()),
        ));
    };
    if input.name != INPUT_NAME {
        return Err(ApiError::bad_request(
            "bad_inputs",
            format!("unknown input `{}`; the model's input is `{INPUT_NAME}`", input.name),
        ));
    }
    if input.datatype != "UINT8" {
        return Err(ApiError::bad_request(
            "bad_datatype",
            format!("input datatype {} (expected UINT8)", input.datatype),
        ));
    }
    let sz = s.size as i64;
    let n = match input.shape.as_slice() {
        [n, h, w, 3] if *n >= 1 && *h == sz && *w == sz => *n as usize,
        other => {
            return Err(ApiError::bad_request(
                "bad_shape",
                format!("input shape {other:?} (expected [N, {sz}, {sz}, 3] with N >= 1)"),
            ))
        }
    };
    if n > s.cfg.max_images {
        return Err(ApiError::too_many_images(n, s.cfg.max_images));
    }
    let mut pixels = Vec::with_capacity(n * s.size * s.size * 3);
    flatten_pixels(&input.data, &mut pixels)
        .map_err(|e| ApiError::bad_request("bad_data", format!("input data: {e}")))?;
    if pixels.len() != n * s.size * s.size * 3 {
        return Err(ApiError::bad_request(
            "bad_shape",
            format!("{} values for shape {:?} ({} expected)", pixels.len(), input.shape, n * s.size * s.size * 3),
        ));
    }
    let wanted: Vec<String> = match &req.outputs {
        Some(o) if !o.is_empty() => o.iter().map(|o| o.name.clone()).collect(),
        _ => vec![LOGITS_NAME.into(), PROBABILITIES_NAME.into()],
    };
    if let Some(bad) = wanted.iter().find(|w| *w != LOGITS_NAME && *w != PROBABILITIES_NAME) {
        return Err(ApiError::bad_request("bad_outputs", format!("unknown output `{bad}`")));
    }
    let b = s.infer(pixels, n).await?;
    let c = s.classes.len();
    let outputs: Vec<Value> = wanted
        .iter()
        .map(|w| {
            let data: Vec<f32> = b
                .predictions
                .iter()
                .flat_map(|p| if w == LOGITS_NAME { p.logits.clone() } else { p.probabilities.clone() })
                .collect();
            json!({"name": w, "datatype": "FP32", "shape": [n, c], "data": data})
        })
        .collect();
    let mut out = json!({"model_name": s.name, "model_version": s.version, "outputs": outputs});
    if let Some(id) = req.id {
        out["id"] = json!(id);
    }
    Ok(Json(out))
}

async fn metrics_page(State(s): State<Arc<AppState>>) -> Response {
    s.metrics.set_queue(s.batcher.queued());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.encode()).into_response()
}

async fn page(State(s): State<Arc<AppState>>) -> Html<String> {
    let name = s.name.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    Html(include_str!("../web/index.html").replace("{{MODEL}}", &name))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see / for the page, /v1/predict, /v2/...")
}

/// The route a path belongs to, as a metrics label (model names folded, unknown paths `other`,
/// so that clients cannot grow the label set).
fn endpoint_label(path: &str) -> String {
    const FIXED: [&str; 6] = ["/", "/v1/predict", "/v2", "/v2/health/live", "/v2/health/ready", "/metrics"];
    if let Some(f) = FIXED.iter().find(|f| **f == path) {
        return f.to_string();
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v2", "models", _] => "/v2/models/{name}",
        ["v2", "models", _, "ready"] => "/v2/models/{name}/ready",
        ["v2", "models", _, "infer"] => "/v2/models/{name}/infer",
        ["v2", "models", _, "versions", _] => "/v2/models/{name}/versions/{version}",
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

/// Whether a path needs the token: inference and model metadata do; the page, health, server
/// metadata, metrics and unknown paths do not.
fn protected(path: &str) -> bool {
    path.starts_with("/v1/") || path.starts_with("/v2/models/")
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
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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

/// The application: routes, limits, auth, metrics, panic guard.
pub fn app(sessions: Vec<OnnxModel>, cfg: ServeConfig) -> Router {
    let first = &sessions[0];
    let d = &first.info.description;
    let (name, version, classes) = (d.name.clone(), first.info.model_version.to_string(), d.classes.clone());
    let (size, preprocessing) = (d.input_size, d.preprocessing.clone());
    let metrics = Metrics::new();
    metrics.set_memory_bound(cfg.memory_bound_bytes(size));
    tracing::info!(
        "requests may take at most {} MiB on top of the loaded model (docs/reliability.md)",
        cfg.memory_bound_bytes(size) >> 20
    );
    let batcher = Batcher::start(sessions, cfg.batch, metrics.batch_observer());
    let (inflight, decodes) = (Arc::new(Semaphore::new(cfg.max_inflight)), Arc::new(Semaphore::new(cfg.max_decodes)));
    let state =
        Arc::new(AppState { name, version, classes, size, preprocessing, metrics, batcher, cfg, inflight, decodes });
    let inference = Router::new()
        .route("/v1/predict", post(predict))
        .route("/v2/models/{name}/infer", post(v2_infer))
        .route_layer(middleware::from_fn_with_state(state.clone(), admit));
    let protected = Router::new()
        .route("/v2/models/{name}", get(v2_model))
        .route("/v2/models/{name}/versions/{version}", get(v2_model))
        .route("/v2/models/{name}/ready", get(v2_model_ready))
        .merge(inference);
    Router::new()
        .route("/", get(page))
        .route("/v2", get(v2_server))
        .route("/v2/health/live", get(v2_live))
        .route("/v2/health/ready", get(v2_ready))
        .route("/metrics", get(metrics_page))
        .merge(protected)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), reject_oversized))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(state.cfg.body_timeout))
        .layer(middleware::from_fn_with_state(state.clone(), limit_time))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
        .with_state(state)
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
/// after `conn.shutdown_deadline`. HTTP/1.1 over hyper, with a header read timeout.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    conn: ConnConfig,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(conn.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
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
