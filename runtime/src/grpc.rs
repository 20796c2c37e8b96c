//! KServe v2 over gRPC: the Open Inference Protocol's `inference.GRPCInferenceService`
//! (proto/open_inference_grpc.proto) with tonic, on its own port, in front of the same model,
//! batcher, limits and token as HTTP; plus Triton's ModelStatistics, RepositoryIndex and
//! RepositoryModelLoad. Inputs come as `raw_input_contents` (what Triton's clients send) or as
//! typed `uint_contents`; outputs go back as `raw_output_contents` (little-endian FP32).

use crate::server::{ApiError, AppState};
use crate::v2;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::*;

/// The gRPC service over the server's state.
pub struct Grpc {
    state: Arc<AppState>,
}

/// The tonic service, with the server's body limit as its message limit.
pub fn service(state: Arc<AppState>) -> GrpcInferenceServiceServer<Grpc> {
    let limit = state.cfg.max_body_bytes;
    GrpcInferenceServiceServer::new(Grpc { state })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit.max(4 << 20))
}

impl Grpc {
    /// The bearer token, when the server has one, from the `authorization` metadata.
    fn authorize<T>(&self, r: &Request<T>) -> Result<(), Status> {
        let Some(token) = self.state.cfg.token.as_deref() else { return Ok(()) };
        let given =
            r.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given.is_some_and(|g| crate::server::constant_time_eq(g.as_bytes(), token.as_bytes())) {
            Ok(())
        } else {
            Err(Status::unauthenticated("missing or wrong `authorization: Bearer` token"))
        }
    }

    fn stats(&self, name: &str, version: &str) -> Result<ModelStatistics, Status> {
        let m = self.state.current();
        if !name.is_empty() {
            v2::check_model(&m, name, Some(version))?;
        }
        let s = &m.stats;
        let d = |t: &crate::model::Tally| {
            let (count, ns) = t.get();
            Some(StatisticDuration { count, ns })
        };
        let zero = Some(StatisticDuration::default());
        let batches = s.batches.lock().unwrap_or_else(|p| p.into_inner());
        use std::sync::atomic::Ordering::Relaxed;
        Ok(ModelStatistics {
            name: m.name.clone(),
            version: m.version.clone(),
            last_inference: s.last_inference_ms.load(Relaxed),
            inference_count: s.inference_count.load(Relaxed),
            execution_count: s.execution_count.load(Relaxed),
            inference_stats: Some(InferStatistics {
                success: d(&s.success),
                fail: d(&s.fail),
                queue: d(&s.queue),
                compute_input: zero,
                compute_infer: d(&s.compute_infer),
                compute_output: zero,
            }),
            batch_stats: batches
                .iter()
                .map(|(size, (count, ns))| InferBatchStatistics {
                    batch_size: *size as u64,
                    compute_input: Some(StatisticDuration { count: *count, ns: 0 }),
                    compute_infer: Some(StatisticDuration { count: *count, ns: *ns }),
                    compute_output: Some(StatisticDuration { count: *count, ns: 0 }),
                })
                .collect(),
        })
    }
}

fn tensor(name: &str, datatype: &str, shape: Vec<i64>) -> model_metadata_response::TensorMetadata {
    model_metadata_response::TensorMetadata { name: name.into(), datatype: datatype.into(), shape }
}

#[tonic::async_trait]
impl GrpcInferenceService for Grpc {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.state.current().ready() }))
    }

    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        self.authorize(&r)?;
        let m = self.state.current();
        let r = r.into_inner();
        v2::check_model(&m, &r.name, Some(&r.version))?;
        Ok(Response::new(ModelReadyResponse { ready: m.ready() }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "footwear-runtime".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: v2::EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.authorize(&r)?;
        let m = self.state.current();
        let r = r.into_inner();
        v2::check_model(&m, &r.name, Some(&r.version))?;
        let (n, c) = (m.size as i64, m.classes.len() as i64);
        use modelspec::onnx_meta::{INPUT_NAME, OOD_SCORE_NAME};
        let mut properties: std::collections::HashMap<String, String> =
            [("classes".to_string(), m.classes.join(",")), ("precision".to_string(), m.precision.clone())]
                .into_iter()
                .collect();
        if let Some(o) = &m.ood {
            properties.insert("ood_threshold".into(), o.threshold.to_string());
        }
        Ok(Response::new(ModelMetadataResponse {
            name: m.name.clone(),
            versions: vec![m.version.clone()],
            platform: "onnxruntime_onnx".into(),
            inputs: vec![tensor(INPUT_NAME, "UINT8", vec![-1, n, n, 3])],
            outputs: v2::outputs(&m)
                .into_iter()
                .map(|o| tensor(o, "FP32", if o == OOD_SCORE_NAME { vec![-1] } else { vec![-1, c] }))
                .collect(),
            properties,
        }))
    }

    async fn model_infer(&self, r: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let t0 = Instant::now();
        self.authorize(&r)?;
        let s = &self.state;
        let _permit = s.inflight.clone().try_acquire_owned().map_err(|_| {
            Status::unavailable(format!(
                "{} requests are already being served (--max-inflight); retry later",
                s.cfg.max_inflight
            ))
        })?;
        let m = s.current();
        let mut r = r.into_inner();
        v2::check_model(&m, &r.model_name, Some(&r.model_version))?;
        let [input] = r.inputs.as_slice() else {
            return Err(Status::invalid_argument(format!(
                "expected exactly one input `{}`, got {}",
                modelspec::onnx_meta::INPUT_NAME,
                r.inputs.len()
            )));
        };
        let n = v2::input_count(&m, s.cfg.max_images, &input.name, &input.datatype, &input.shape)?;
        let pixels = match (r.raw_input_contents.len(), &input.contents) {
            (1, None) => std::mem::take(&mut r.raw_input_contents[0]),
            (0, Some(c)) => c
                .uint_contents
                .iter()
                .map(|&v| u8::try_from(v).map_err(|_| format!("{v} is not a UINT8 value (0-255)")))
                .collect::<Result<Vec<u8>, String>>()
                .map_err(|e| Status::invalid_argument(format!("input `{}` uint_contents: {e}", input.name)))?,
            (raw, typed) => {
                return Err(Status::invalid_argument(format!(
                    "input `{}`: give its data either in raw_input_contents (one entry) or in contents.uint_contents; got {raw} raw entries and {} contents",
                    input.name,
                    if typed.is_some() { "typed" } else { "no" }
                )))
            }
        };
        v2::check_pixel_count(&m, pixels.len(), n, &input.shape)?;
        let names = v2::output_names(&m, r.outputs.iter().map(|o| o.name.clone()).collect())?;
        let b = s.infer(&m, pixels, n, t0).await?;
        v2::count_unknown(s, &m, &b);
        let mut outputs = Vec::new();
        let mut raw = Vec::new();
        for name in &names {
            outputs.push(model_infer_response::InferOutputTensor {
                name: name.clone(),
                datatype: "FP32".into(),
                shape: v2::output_shape(&m, name, n),
                ..Default::default()
            });
            raw.push(v2::output_values(&b, name).iter().flat_map(|v| v.to_le_bytes()).collect());
        }
        Ok(Response::new(ModelInferResponse {
            model_name: m.name.clone(),
            model_version: m.version.clone(),
            id: r.id,
            parameters: Default::default(),
            outputs,
            raw_output_contents: raw,
        }))
    }

    async fn model_statistics(
        &self,
        r: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        self.authorize(&r)?;
        let r = r.into_inner();
        Ok(Response::new(ModelStatisticsResponse { model_stats: vec![self.stats(&r.name, &r.version)?] }))
    }

    async fn repository_index(
        &self,
        r: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        self.authorize(&r)?;
        let m = self.state.current();
        let state = if m.ready() { "READY" } else { "UNAVAILABLE" };
        Ok(Response::new(RepositoryIndexResponse {
            models: vec![repository_index_response::ModelIndex {
                name: m.name.clone(),
                version: m.version.clone(),
                state: state.into(),
                reason: String::new(),
            }],
        }))
    }

    async fn repository_model_load(
        &self,
        r: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.authorize(&r)?;
        let r = r.into_inner();
        v2::check_model(&self.state.current(), &r.model_name, None)?;
        if !r.parameters.is_empty() {
            return Err(Status::invalid_argument(format!(
                "load parameters {:?} are not supported: replace the model file and load again",
                r.parameters.keys().collect::<Vec<_>>()
            )));
        }
        self.state.reload(false).await.map_err(|e| match e {
            crate::server::ReloadError::Busy => Status::aborted(e.to_string()),
            crate::server::ReloadError::Refused(e) => Status::failed_precondition(e),
        })?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        use axum::http::StatusCode as H;
        let code = match e.status() {
            H::NOT_FOUND => tonic::Code::NotFound,
            H::UNAUTHORIZED => tonic::Code::Unauthenticated,
            H::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
            H::PAYLOAD_TOO_LARGE => tonic::Code::ResourceExhausted,
            H::REQUEST_TIMEOUT => tonic::Code::DeadlineExceeded,
            s if s.is_server_error() => tonic::Code::Internal,
            _ => tonic::Code::InvalidArgument,
        };
        Status::new(code, e.message().to_string())
    }
}

/// What a gRPC call costs the server before its handler runs, by method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallKind {
    /// Health and server metadata: no token, no inference permit, a small message.
    Open,
    /// Model readiness, metadata, statistics, the repository index: the token, a small message,
    /// no inference permit (they never wait behind inference).
    Small,
    /// Inference and reload (and any method this server does not know): the token, then an
    /// inference permit, then the message up to the server's limit.
    Heavy,
}

fn call_kind(path: &str) -> CallKind {
    match path.strip_prefix("/inference.GRPCInferenceService/") {
        Some("ServerLive" | "ServerReady" | "ServerMetadata") => CallKind::Open,
        Some("ModelReady" | "ModelMetadata" | "ModelStatistics" | "RepositoryIndex") => CallKind::Small,
        _ => CallKind::Heavy,
    }
}

/// The most a message of an [`CallKind::Open`] or [`CallKind::Small`] call may take: each is a
/// model name, a version and a few parameters.
const SMALL_MESSAGE: usize = 64 << 10;

/// A tower layer in front of the gRPC routes that refuses on the request's headers, before a
/// byte of the message is read or decoded: a missing or wrong token (`UNAUTHENTICATED`), and
/// inference calls beyond `--max-inflight` (`RESOURCE_EXHAUSTED`, the permit held until the
/// answer is built). Health, readiness and metadata take no permit, so that they answer while
/// every permit is held, and their messages are cut at [`SMALL_MESSAGE`].
/// A `ModelInfer` message is read whole (at most `max_message` bytes) and its protobuf fields
/// counted ([`check_infer_message`]) before prost decodes it: decoded, 16 MiB of empty `inputs`
/// entries took 2.5 GB.
#[derive(Clone)]
pub struct Gate {
    token: Option<Arc<str>>,
    permits: Arc<tokio::sync::Semaphore>,
    max_message: usize,
}

impl Gate {
    pub fn new(token: Option<&str>, max_inflight: usize, max_message: usize) -> Self {
        Self { token: token.map(Arc::from), permits: Arc::new(tokio::sync::Semaphore::new(max_inflight)), max_message }
    }

    fn authorized(&self, headers: &tonic::codegen::http::HeaderMap) -> bool {
        let Some(token) = self.token.as_deref() else { return true };
        let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        given.is_some_and(|g| crate::server::constant_time_eq(g.as_bytes(), token.as_bytes()))
    }
}

impl<S> tower::Layer<S> for Gate {
    type Service = Gated<S>;
    fn layer(&self, inner: S) -> Gated<S> {
        Gated { inner, gate: self.clone() }
    }
}

/// The service [`Gate`] wraps.
#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Gate,
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;

impl<S, R> tower::Service<HttpRequest> for Gated<S>
where
    S: tower::Service<HttpRequest, Response = tonic::codegen::http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        // The clone that was made ready is the one that serves (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let refuse = |s: Status| -> Self::Future { Box::pin(async move { Ok(s.into_http()) }) };
        let kind = call_kind(req.uri().path());
        if kind != CallKind::Open && !self.gate.authorized(req.headers()) {
            return refuse(Status::unauthenticated("missing or wrong `authorization: Bearer` token"));
        }
        match kind {
            CallKind::Open | CallKind::Small => {
                let req = req.map(|b| tonic::body::Body::new(http_body_util::Limited::new(b, SMALL_MESSAGE)));
                Box::pin(inner.call(req))
            }
            CallKind::Heavy => {
                let Ok(permit) = self.gate.permits.clone().try_acquire_owned() else {
                    return refuse(Status::resource_exhausted(
                        "the server is at --max-inflight calls; retry later (health and metadata still answer)",
                    ));
                };
                let infer = req.uri().path().ends_with("/ModelInfer");
                let max_message = self.gate.max_message;
                Box::pin(async move {
                    let req = if infer {
                        use http_body_util::BodyExt;
                        let (parts, body) = req.into_parts();
                        // The frame header (5 bytes) beside the message; past the limit tonic's
                        // own check would refuse it anyway.
                        let bytes = match http_body_util::Limited::new(body, max_message + 5).collect().await {
                            Ok(b) => b.to_bytes(),
                            Err(e) => {
                                let s = if e.is::<http_body_util::LengthLimitError>() {
                                    Status::resource_exhausted(format!(
                                        "message larger than {max_message} bytes (--max-body-mib)"
                                    ))
                                } else {
                                    Status::cancelled(format!("reading the message: {e}"))
                                };
                                return Ok(s.into_http());
                            }
                        };
                        if let Err(why) = check_infer_frames(&bytes) {
                            return Ok(Status::invalid_argument(why).into_http());
                        }
                        HttpRequest::from_parts(parts, tonic::body::Body::new(http_body_util::Full::new(bytes)))
                    } else {
                        req
                    };
                    let answer = inner.call(req).await;
                    drop(permit);
                    answer
                })
            }
        }
    }
}

/// Checks the gRPC frames of a `ModelInfer` request body (flag, length, message) with
/// [`check_infer_message`]; a compressed frame is left to tonic (which refuses it: no
/// compression is enabled), a short one to its decoder.
fn check_infer_frames(mut body: &[u8]) -> Result<(), String> {
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        if body[0] != 0 || body.len() < 5 + len {
            return Ok(());
        }
        check_infer_message(&body[5..5 + len])?;
        body = &body[5 + len..];
    }
    Ok(())
}

/// The most `parameters` entries a request or an input may carry.
const MAX_PARAMETERS: usize = 64;
/// The longest request `id` (it is echoed in the answer).
const MAX_ID: usize = v2::MAX_ID;

/// Counts the protobuf fields of a `ModelInferRequest` (the KServe v2 proto: 3 `id`, 4
/// `parameters`, 5 `inputs`, 6 `outputs`, 7 `raw_input_contents`; in an input, 3 `shape` and 4
/// `parameters`) on the wire, before any is decoded: at most one input and one raw content (the
/// model has one input), three outputs (the model has at most three), 64 parameters, 16
/// dimensions, a 4 KiB `id`. Each entry decoded costs a few hundred bytes for as little as two
/// on the wire, so that a message of millions of empty entries would take gigabytes.
pub fn check_infer_message(msg: &[u8]) -> Result<(), String> {
    let (mut inputs, mut outputs, mut raw, mut params) = (0usize, 0usize, 0usize, 0usize);
    walk(msg, &mut |field, payload| {
        match field {
            3 if payload.map_or(0, <[u8]>::len) > MAX_ID => Err(format!("`id` longer than {MAX_ID} bytes")),
            4 => count(&mut params, MAX_PARAMETERS, "`parameters` entries"),
            5 => {
                count(&mut inputs, 1, "`inputs` (the model has one input)")?;
                let (mut dims, mut input_params) = (0usize, 0usize);
                walk(payload.unwrap_or_default(), &mut |f, p| match (f, p) {
                    // `shape`: packed (one field of varints) or not (a field per dimension).
                    (3, Some(packed)) => {
                        dims += packed.iter().filter(|b| **b < 0x80).count();
                        if dims > 16 {
                            Err("an input `shape` of more than 16 dimensions".to_string())
                        } else {
                            Ok(())
                        }
                    }
                    (3, None) => count(&mut dims, 16, "`shape` dimensions of an input"),
                    (4, _) => count(&mut input_params, MAX_PARAMETERS, "`parameters` entries of an input"),
                    _ => Ok(()),
                })
            }
            6 => count(&mut outputs, 3, "`outputs` (the model has at most three: logits, probabilities, ood_score)"),
            7 => count(&mut raw, 1, "`raw_input_contents` (the model has one input)"),
            _ => Ok(()),
        }
    })
}

fn count(n: &mut usize, most: usize, what: &str) -> Result<(), String> {
    *n += 1;
    if *n > most {
        return Err(format!("more than {most} {what} in the message: refused before it is decoded"));
    }
    Ok(())
}

/// Calls `f(field number, payload)` for each top-level field of a protobuf message (`payload`:
/// the bytes of a length-delimited field, `None` for a number); `Err` for bytes that are not a
/// protobuf message.
/// What [`walk`] calls for each field.
type Visit<'a> = dyn FnMut(u64, Option<&[u8]>) -> Result<(), String> + 'a;

fn walk(mut b: &[u8], f: &mut Visit<'_>) -> Result<(), String> {
    fn varint(b: &mut &[u8]) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in 0..10 {
            let (&byte, rest) = b.split_first().ok_or("a truncated protobuf varint")?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << (7 * shift);
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err("a protobuf varint of more than 10 bytes".into())
    }
    let skip = |b: &mut &[u8], n: usize| -> Result<(), String> {
        if b.len() < n {
            return Err("a truncated protobuf field".into());
        }
        *b = &b[n..];
        Ok(())
    };
    while !b.is_empty() {
        let tag = varint(&mut b)?;
        match tag & 7 {
            0 => {
                varint(&mut b)?;
                f(tag >> 3, None)?;
            }
            1 => {
                skip(&mut b, 8)?;
                f(tag >> 3, None)?;
            }
            2 => {
                let len = usize::try_from(varint(&mut b)?).map_err(|_| "a protobuf length past memory")?;
                if b.len() < len {
                    return Err("a truncated protobuf field".into());
                }
                let (payload, rest) = b.split_at(len);
                b = rest;
                f(tag >> 3, Some(payload))?;
            }
            5 => {
                skip(&mut b, 4)?;
                f(tag >> 3, None)?;
            }
            w => return Err(format!("protobuf wire type {w} (not a ModelInferRequest)")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_messages_are_counted_before_they_are_decoded() {
        use prost::Message;
        // A request as Triton's clients send it passes.
        let good = ModelInferRequest {
            model_name: "footwear".into(),
            id: "x".into(),
            inputs: vec![model_infer_request::InferInputTensor {
                name: "image".into(),
                datatype: "UINT8".into(),
                shape: vec![2, 96, 96, 3],
                ..Default::default()
            }],
            outputs: vec![
                model_infer_request::InferRequestedOutputTensor { name: "probabilities".into(), ..Default::default() },
                model_infer_request::InferRequestedOutputTensor { name: "ood_score".into(), ..Default::default() },
            ],
            raw_input_contents: vec![vec![7u8; 2 * 96 * 96 * 3]],
            ..Default::default()
        };
        assert_eq!(check_infer_message(&good.encode_to_vec()), Ok(()));
        // Millions of empty inputs, outputs asked again and again, a huge id, a 17-d shape.
        let bomb = [0x2a, 0x00].repeat(1_000_000);
        assert!(check_infer_message(&bomb).unwrap_err().contains("`inputs`"));
        assert!(check_infer_message(&[0x32, 0x00].repeat(4)).unwrap_err().contains("`outputs`"));
        let mut long_id = good.clone();
        long_id.id = "i".repeat(5000);
        assert!(check_infer_message(&long_id.encode_to_vec()).unwrap_err().contains("`id`"));
        let mut deep = good.clone();
        deep.inputs[0].shape = vec![1; 17];
        assert!(check_infer_message(&deep.encode_to_vec()).unwrap_err().contains("16 dimensions"));
        assert!(check_infer_message(&[0x2b]).unwrap_err().contains("wire type 3"));
        // Frames: a good one passes, the bomb's frame is refused.
        let frame = |m: &[u8]| [&[0u8][..], &(m.len() as u32).to_be_bytes(), m].concat();
        assert_eq!(check_infer_frames(&frame(&good.encode_to_vec())), Ok(()));
        assert!(check_infer_frames(&frame(&bomb)).is_err());
    }
}
