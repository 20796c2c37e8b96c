//! The Open Inference Protocol (KServe v2) over HTTP, with Triton's extensions that common
//! tools call: binary tensor data (`Inference-Header-Content-Length`, requests and answers),
//! model configuration, model repository (index, load = zero-downtime reload) and statistics.
//! The tensor checks are shared with the gRPC service ([`crate::grpc`]).

use crate::model::Served;
use crate::server::{body_error, ApiError, AppState};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use modelspec::onnx_meta::{INPUT_NAME, LOGITS_NAME, OOD_SCORE_NAME, PROBABILITIES_NAME};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;

/// The header of the binary tensor data extension: the length of the JSON part of a body whose
/// tensors follow it as raw bytes.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// What `/v2` and gRPC's ServerMetadata list.
pub const EXTENSIONS: [&str; 4] = ["binary_tensor_data", "model_configuration", "model_repository", "statistics"];

/// `{name}` and, on the `/versions/{version}/` routes, `{version}`.
#[derive(Deserialize)]
pub struct ModelPath {
    name: String,
    version: Option<String>,
}

/// The model a request names, if it is the one served (and, if a version is named, its version).
pub fn check_model(m: &Served, name: &str, version: Option<&str>) -> Result<(), ApiError> {
    if name != m.name {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_model",
            format!("model `{name}` not found; this server serves `{}`", m.name),
        ));
    }
    match version {
        Some(v) if !v.is_empty() && v != m.version => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_version",
            format!("model `{name}` has no version {v}; version {} is served", m.version),
        )),
        _ => Ok(()),
    }
}

/// The image count of an input tensor, after checking its name, type and shape against the
/// model (`[N, size, size, 3]`, UINT8, 1 <= N <= `max_images`).
pub fn input_count(
    m: &Served,
    max_images: usize,
    name: &str,
    datatype: &str,
    shape: &[i64],
) -> Result<usize, ApiError> {
    if name != INPUT_NAME {
        return Err(ApiError::bad_request(
            "bad_inputs",
            format!("unknown input `{name}`; the model's input is `{INPUT_NAME}`"),
        ));
    }
    if datatype != "UINT8" {
        return Err(ApiError::bad_request("bad_datatype", format!("input datatype {datatype} (expected UINT8)")));
    }
    let sz = m.size as i64;
    let n = match shape {
        [n, h, w, 3] if *n >= 1 && *h == sz && *w == sz => *n as usize,
        other => {
            return Err(ApiError::bad_request(
                "bad_shape",
                format!("input shape {other:?} (expected [N, {sz}, {sz}, 3] with N >= 1)"),
            ))
        }
    };
    if n > max_images {
        return Err(ApiError::too_many_images(n, max_images));
    }
    Ok(n)
}

/// Checks that `got` pixel values fill `n` images of the model's size.
pub fn check_pixel_count(m: &Served, got: usize, n: usize, shape: &[i64]) -> Result<(), ApiError> {
    let want = n * m.size * m.size * 3;
    if got != want {
        return Err(ApiError::bad_request("bad_shape", format!("{got} values for shape {shape:?} ({want} expected)")));
    }
    Ok(())
}

/// The outputs of the model served: `logits`, `probabilities` and, in files with the
/// out-of-distribution output (unless `--ood off`), `ood_score`.
pub fn outputs(m: &Served) -> Vec<&'static str> {
    let mut o = vec![LOGITS_NAME, PROBABILITIES_NAME];
    if m.ood.is_some() {
        o.push(OOD_SCORE_NAME);
    }
    o
}

/// Checks requested output names (none: every output).
pub fn output_names(m: &Served, names: Vec<String>) -> Result<Vec<String>, ApiError> {
    let known = outputs(m);
    let names = if names.is_empty() { known.iter().map(|s| s.to_string()).collect() } else { names };
    if let Some(bad) = names.iter().find(|w| !known.contains(&w.as_str())) {
        let list: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
        return Err(ApiError::bad_request(
            "bad_outputs",
            format!("unknown output `{bad}`; the outputs are {}", list.join(", ")),
        ));
    }
    // Each at most once: a request naming one output 670,000 times was once answered with a
    // 116 MB body (issue 27).
    if let Some((i, dup)) = names.iter().enumerate().find(|(i, n)| names[..*i].contains(n)) {
        return Err(ApiError::bad_request(
            "bad_outputs",
            format!(
                "output `{dup}` is asked for more than once (entries {} and {})",
                names.iter().position(|n| n == dup).unwrap_or(0) + 1,
                i + 1
            ),
        ));
    }
    Ok(names)
}

/// The shape of output `name` for `n` images: [n, classes], or [n] for `ood_score`.
pub fn output_shape(m: &Served, name: &str, n: usize) -> Vec<i64> {
    if name == OOD_SCORE_NAME {
        vec![n as i64]
    } else {
        vec![n as i64, m.classes.len() as i64]
    }
}

/// The rows of one output, flattened.
pub fn output_values(b: &crate::batcher::Batched, name: &str) -> Vec<f32> {
    match name {
        OOD_SCORE_NAME => b.predictions.iter().map(|p| p.ood_score.unwrap_or(f32::NAN)).collect(),
        LOGITS_NAME => b.predictions.iter().flat_map(|p| &p.logits).copied().collect(),
        _ => b.predictions.iter().flat_map(|p| &p.probabilities).copied().collect(),
    }
}

/// Counts the images of a v2 or gRPC answer beyond the out-of-distribution threshold (those
/// clients read `ood_score` and decide themselves; the counter says what the runtime would).
pub fn count_unknown(s: &AppState, m: &Served, b: &crate::batcher::Batched) {
    s.metrics.answered(b.predictions.iter().map(|p| {
        inference::answer::OodCheck::of(p.ood_score, m.ood.as_ref(), true)
            .filter(|c| c.rejects())
            .map(|_| inference::answer::OUT_OF_DISTRIBUTION)
    }));
}

/// The metadata parameters of the model served: classes, precision and, with the output, the
/// threshold above which `ood_score` means out of distribution.
fn parameters(m: &Served) -> Value {
    let mut p = json!({"classes": m.classes, "precision": m.precision});
    if let Some(o) = &m.ood {
        p["ood_threshold"] = json!(o.threshold);
        p["ood_method"] = json!(o.method);
    }
    p
}

/// Model metadata as `/v2/models/{name}` answers it.
pub fn metadata(m: &Served) -> Value {
    let (n, c) = (m.size as i64, m.classes.len());
    json!({
        "name": m.name,
        "versions": [m.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, n, n, 3]}],
        "outputs": outputs(m).iter().map(|o| {
            let shape = if *o == OOD_SCORE_NAME { json!([-1]) } else { json!([-1, c]) };
            json!({"name": o, "datatype": "FP32", "shape": shape})
        }).collect::<Vec<_>>(),
        "parameters": parameters(m),
    })
}

/// The model's configuration in Triton's form (`GET /v2/models/{name}/config`).
fn config(s: &AppState, m: &Served) -> Value {
    let (n, c) = (m.size, m.classes.len());
    let b = &s.cfg.batch;
    json!({
        "name": m.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": s.cfg.max_images,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [n, n, 3]}],
        // One value per image: Triton writes it as dims [1] reshaped to [] (a batch of N gives [N]).
        "output": outputs(m).iter().map(|o| if *o == OOD_SCORE_NAME {
            json!({"name": o, "data_type": "TYPE_FP32", "dims": [1], "reshape": {"shape": []}})
        } else {
            json!({"name": o, "data_type": "TYPE_FP32", "dims": [c]})
        }).collect::<Vec<_>>(),
        "dynamic_batching": {
            "preferred_batch_size": [b.max_batch],
            "max_queue_delay_microseconds": b.max_delay.as_micros() as u64,
        },
        "instance_group": [{"name": m.name, "kind": "KIND_CPU", "count": m.batcher.live()}],
        "parameters": {
            "classes": {"string_value": m.classes.join(",")},
            "precision": {"string_value": m.precision},
            "file": {"string_value": m.file.display().to_string()},
            "ood_threshold": {"string_value": m.ood.as_ref().map(|o| o.threshold.to_string()).unwrap_or_default()},
        },
    })
}

pub async fn server_metadata() -> Json<Value> {
    Json(json!({"name": "footwear-runtime", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS}))
}

pub async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

/// Ready once the model is loaded and warm (the port opens only then) and while a session
/// worker runs; a reload does not change it (the old model serves until the new one is warm).
pub async fn ready(State(s): State<Arc<AppState>>) -> Response {
    let m = s.current();
    let live = m.batcher.live();
    let status = if live > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"ready": live > 0, "live_sessions": live, "model_version": m.version}))).into_response()
}

pub async fn model(State(s): State<Arc<AppState>>, Path(p): Path<ModelPath>) -> Result<Json<Value>, ApiError> {
    let m = s.current();
    check_model(&m, &p.name, p.version.as_deref())?;
    Ok(Json(metadata(&m)))
}

pub async fn model_ready(State(s): State<Arc<AppState>>, Path(p): Path<ModelPath>) -> Result<Response, ApiError> {
    let m = s.current();
    check_model(&m, &p.name, p.version.as_deref())?;
    let status = if m.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((status, Json(json!({"name": m.name, "version": m.version, "ready": m.ready()}))).into_response())
}

pub async fn model_config(State(s): State<Arc<AppState>>, Path(p): Path<ModelPath>) -> Result<Json<Value>, ApiError> {
    let m = s.current();
    check_model(&m, &p.name, p.version.as_deref())?;
    Ok(Json(config(&s, &m)))
}

/// `GET /v2/models/stats` (every model: the one served) and `/v2/models/{name}[/versions/{v}]/stats`.
pub async fn stats(State(s): State<Arc<AppState>>, p: Option<Path<ModelPath>>) -> Result<Json<Value>, ApiError> {
    let m = s.current();
    if let Some(Path(p)) = &p {
        check_model(&m, &p.name, p.version.as_deref())?;
    }
    Ok(Json(json!({"model_stats": [m.stats.to_json(&m.name, &m.version)]})))
}

/// `POST /v2/repository/index`: the one model, its version and state.
pub async fn repository_index(State(s): State<Arc<AppState>>) -> Json<Value> {
    let m = s.current();
    let state = if m.ready() { "READY" } else { "UNAVAILABLE" };
    Json(json!([{"name": m.name, "version": m.version, "state": state}]))
}

/// A reload changes the server, so a browser must not be able to ask for one from another site
/// (a "simple" cross-site POST needs no CORS preflight, and without `--token` nothing else would
/// stop it): refused when the browser says the request is cross-site (`Sec-Fetch-Site`), when its
/// `Origin` is neither this server's own nor one `--cors-origin` names, and when its content type
/// is one a simple cross-site request can carry (`text/plain`, form data). Clients that are not
/// browsers (curl, Triton's) send none of these.
fn refuse_cross_site(headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let refuse = |why: String| Err(ApiError::new(StatusCode::FORBIDDEN, "cross_site_request", why));
    let get = |h: &str| headers.get(h).map(|v| v.to_str().unwrap_or("(not text)").to_ascii_lowercase());
    if let Some(site) = get("sec-fetch-site").filter(|s| s != "same-origin" && s != "none") {
        return refuse(format!("a reload asked by a web page of another site (Sec-Fetch-Site: {site}) is refused"));
    }
    if let Some(origin) = get("origin") {
        let own = get("host").is_some_and(|h| origin == format!("http://{h}") || origin == format!("https://{h}"));
        if !own && !allowed.iter().any(|a| a.to_ascii_lowercase() == origin) {
            return refuse(format!(
                "a reload asked by a web page of {origin} is refused (--cors-origin names the origins allowed)"
            ));
        }
    }
    if let Some(ct) = get("content-type") {
        let mime = ct.split(';').next().unwrap_or("").trim().to_string();
        if ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"].contains(&mime.as_str()) {
            return refuse(format!("a load request is JSON (application/json) or empty, not {mime}"));
        }
    }
    Ok(())
}

/// `POST /v2/repository/models/{name}/load`: reloads the model file (zero downtime; see
/// [`AppState::reload`]). The answer says which version serves now, or why the file was refused.
pub async fn repository_load(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    refuse_cross_site(&headers, &s.cfg.cors_origins)?;
    check_model(&s.current(), &name, None)?;
    let body = body.map_err(|e| body_error(e.status(), e, s.cfg.max_body_bytes))?;
    if !body.is_empty() {
        // Triton's clients send `{}` or `{"parameters": {...}}`; a new configuration or file
        // contents in the request are not taken: the server reloads its own file.
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("malformed_json", format!("load request: {e}")))?;
        if let Some(p) = v.get("parameters").and_then(Value::as_object).filter(|p| !p.is_empty()) {
            let keys: Vec<&String> = p.keys().collect();
            return Err(ApiError::bad_request(
                "unsupported_parameters",
                format!(
                    "load parameters {keys:?} are not supported: replace the model file ({}) and load again",
                    s.current().file.display()
                ),
            ));
        }
    }
    let m = s.reload(false).await.map_err(|e| match e {
        crate::server::ReloadError::Busy => ApiError::new(StatusCode::CONFLICT, "reload_running", e.to_string()),
        crate::server::ReloadError::Refused(e) => ApiError::new(StatusCode::BAD_REQUEST, "reload_failed", e),
    })?;
    Ok(Json(json!({"name": m.name, "version": m.version, "file": m.file.display().to_string(), "state": "READY"})))
}

pub async fn repository_unload(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_model(&s.current(), &name, None)?;
    Err(ApiError::bad_request(
        "unsupported",
        "this server serves one model and does not unload it; stop the process (SIGTERM) instead",
    ))
}

#[derive(Deserialize, Default)]
struct Parameters {
    binary_data_size: Option<usize>,
    binary_data: Option<bool>,
    binary_data_output: Option<bool>,
    classification: Option<Value>,
}

#[derive(Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    data: Option<Pixels>,
    #[serde(default)]
    parameters: Parameters,
}

/// A list of at most `N` elements, refused at the `N + 1`-th as it is read (the model has one
/// input and at most three outputs: a list of millions is not built first).
fn at_most<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>, const N: usize>(d: D) -> Result<Vec<T>, D::Error> {
    struct V<T, const N: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for V<T, N> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {N}")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(x) = seq.next_element()? {
                if out.len() == N {
                    return Err(serde::de::Error::custom(format!(
                        "more than {N} in the list (this model has no more)"
                    )));
                }
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V::<T, N>(std::marker::PhantomData))
}

fn at_most_some<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
    d: D,
) -> Result<Option<Vec<T>>, D::Error> {
    at_most::<D, T, N>(d).map(Some)
}

/// An input's `data`: a (possibly nested) JSON array of UINT8 values, flattened into bytes as it
/// is read, one byte per value (never a `serde_json::Value` of the whole array: a body of
/// millions of tiny objects stops at the first one).
struct Pixels(Vec<u8>);

impl<'de> Deserialize<'de> for Pixels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        serde::de::DeserializeSeed::deserialize(Flatten(&mut out), d)?;
        Ok(Pixels(out))
    }
}

/// Appends the UINT8 values of an array (or of one number), at any depth, to its vector.
struct Flatten<'o>(&'o mut Vec<u8>);

impl<'de> serde::de::DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Flatten<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("UINT8 values (0-255), in nested arrays")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        let b = u8::try_from(v).map_err(|_| E::custom(format!("{v} is not a UINT8 value (0-255)")))?;
        self.0.push(b);
        Ok(())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        Err(E::custom(format!("{v} is not a UINT8 value (0-255)")))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        if v.fract() == 0.0 && (0.0..=255.0).contains(&v) {
            self.0.push(v as u8);
            Ok(())
        } else {
            Err(E::custom(format!("{v} is not a UINT8 value (0-255)")))
        }
    }
}

#[derive(Deserialize)]
struct InferOutputRequest {
    name: String,
    #[serde(default)]
    parameters: Parameters,
}

/// The longest request `id`, HTTP and gRPC alike.
pub const MAX_ID: usize = 4096;

#[derive(Deserialize)]
struct InferRequest {
    id: Option<String>,
    #[serde(deserialize_with = "at_most::<_, _, 1>")]
    inputs: Vec<InferInput>,
    #[serde(default, deserialize_with = "at_most_some::<_, _, 3>")]
    outputs: Option<Vec<InferOutputRequest>>,
    #[serde(default)]
    parameters: Parameters,
}

/// `POST /v2/models/{name}[/versions/{v}]/infer`: JSON tensors, or the binary tensor data
/// extension (the JSON header's length in `Inference-Header-Content-Length`, the input's bytes
/// after it); outputs as JSON or, when asked (`binary_data_output`, or an output's
/// `binary_data`), as little-endian FP32 bytes after the JSON header.
pub async fn infer(
    State(s): State<Arc<AppState>>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let m = s.current();
    check_model(&m, &p.name, p.version.as_deref())?;
    let body = body.map_err(|e| body_error(e.status(), e, s.cfg.max_body_bytes))?;
    let (head, mut binary) = match headers.get(HEADER_LENGTH) {
        None => (body, Bytes::new()),
        Some(v) => {
            let len = v.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()).ok_or_else(|| {
                ApiError::bad_request("bad_header", format!("{HEADER_LENGTH}: {v:?} is not a byte count"))
            })?;
            if len > body.len() {
                return Err(ApiError::bad_request(
                    "bad_header",
                    format!("{HEADER_LENGTH} is {len} but the body has {} bytes", body.len()),
                ));
            }
            (body.slice(..len), body.slice(len..))
        }
    };
    let req: InferRequest = serde_json::from_slice(&head)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("inference request: {e}")))?;
    let mut req = req;
    // The id comes back in the answer: a 15 MiB one made each answer 15 MiB (issue 27).
    if let Some(id) = req.id.as_ref().filter(|id| id.len() > MAX_ID) {
        return Err(ApiError::bad_request(
            "bad_id",
            format!("`id` of {} bytes; at most {MAX_ID} (it is echoed in the answer)", id.len()),
        ));
    }
    let [input] = req.inputs.as_mut_slice() else {
        return Err(ApiError::bad_request(
            "bad_inputs",
            format!("expected exactly one input `{INPUT_NAME}`, got {}", req.inputs.len()),
        ));
    };
    let n = input_count(&m, s.cfg.max_images, &input.name, &input.datatype, &input.shape)?;
    let pixels = match (input.parameters.binary_data_size, &mut input.data) {
        (Some(size), _) => {
            if size != binary.len() {
                return Err(ApiError::bad_request(
                    "bad_binary_data",
                    format!(
                        "input `{}`: binary_data_size is {size} but {} bytes follow the JSON header",
                        input.name,
                        binary.len()
                    ),
                ));
            }
            std::mem::take(&mut binary).to_vec()
        }
        (None, Some(data)) => std::mem::take(&mut data.0),
        (None, None) => {
            return Err(ApiError::bad_request(
                "bad_data",
                format!("input `{}` has neither `data` nor a `binary_data_size` parameter", input.name),
            ))
        }
    };
    if !binary.is_empty() {
        return Err(ApiError::bad_request(
            "bad_binary_data",
            format!("{} bytes after the JSON header belong to no input", binary.len()),
        ));
    }
    check_pixel_count(&m, pixels.len(), n, &input.shape)?;
    let all_binary = req.parameters.binary_data_output.unwrap_or(false);
    let requested = req.outputs.unwrap_or_default();
    if let Some(o) = requested.iter().find(|o| o.parameters.classification.is_some()) {
        return Err(ApiError::bad_request(
            "unsupported_parameters",
            format!("output `{}`: the classification extension is not supported; read `{PROBABILITIES_NAME}`", o.name),
        ));
    }
    let binary_of: Vec<(String, bool)> =
        requested.iter().map(|o| (o.name.clone(), o.parameters.binary_data.unwrap_or(all_binary))).collect();
    let names = output_names(&m, binary_of.iter().map(|(n, _)| n.clone()).collect())?;
    let b = s.infer(&m, pixels, n, t0).await?;
    count_unknown(&s, &m, &b);
    let mut blob = Vec::new();
    let outputs: Vec<Value> = names
        .iter()
        .map(|name| {
            let values = output_values(&b, name);
            let binary = binary_of.iter().find(|(n, _)| n == name).map_or(all_binary, |(_, b)| *b);
            let mut o = Map::new();
            o.insert("name".into(), json!(name));
            o.insert("datatype".into(), json!("FP32"));
            o.insert("shape".into(), json!(output_shape(&m, name, n)));
            if let (OOD_SCORE_NAME, Some(t)) = (name.as_str(), &m.ood) {
                o.insert("parameters".into(), json!({"threshold": t.threshold}));
            }
            if binary {
                let p = o.entry("parameters").or_insert_with(|| json!({}));
                p["binary_data_size"] = json!(values.len() * 4);
                blob.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            } else {
                o.insert("data".into(), json!(values));
            }
            Value::Object(o)
        })
        .collect();
    let mut out = json!({"model_name": m.name, "model_version": m.version, "outputs": outputs});
    if let Some(id) = req.id {
        out["id"] = json!(id);
    }
    if blob.is_empty() {
        return Ok(Json(out).into_response());
    }
    let head = serde_json::to_vec(&out).expect("serializing JSON");
    let len = head.len();
    let mut body = head;
    body.extend_from_slice(&blob);
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(HEADER_LENGTH, HeaderValue::from(len));
    Ok(r)
}
