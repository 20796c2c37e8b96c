//! `footwear`: predictions from one self-describing model.onnx, on the command line
//! (`predict`) or over HTTP (`serve`). Exit codes: 0 all predicted, 1 fatal error (model,
//! library, arguments), 2 some inputs could not be read (the others were predicted).

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use inference::answer::{answer, Answer, OodCheck};
use inference::batch::predict_files;
use inference::{OnnxModel, SessionConfig};
use modelspec::preprocess::image_files;
use runtime::batcher::BatchConfig;
use runtime::server::{self, ServeConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(version, about = "Serve predictions from a model.onnx written by the footwear exporter")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Classify image files, folders or globs.
    Predict(PredictArgs),
    /// Serve predictions over HTTP (/v1/predict, KServe v2, /metrics, a web page at /).
    ///
    /// SIGHUP or `POST /v2/repository/models/NAME/load` reloads the model file without
    /// downtime: replace the file (e.g. `mv new.onnx model.onnx`), then signal; a file that fails
    /// to load or warm up leaves the old model serving.
    Serve(Box<ServeArgs>),
    /// Print what the model's metadata says.
    Info(ModelArgs),
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// The ONNX file.
    #[arg(short, long, env = "FOOTWEAR_MODEL", default_value = "model.onnx")]
    model: PathBuf,
    /// ONNX Runtime library [default: $ORT_DYLIB_PATH, else .local/onnxruntime/libonnxruntime.so.1.31.1;
    /// with --device cuda, .local/onnxruntime-gpu/onnxruntime/capi/libonnxruntime.so.1.31.1 first].
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Execution provider.
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    /// With --device cuda: fail rather than fall back to the CPU.
    #[arg(long)]
    require_cuda: bool,
    /// ONNX Runtime intra-op threads per session (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Turn off ONNX Runtime's memory arena (less memory with large batches, slower).
    #[arg(long)]
    no_memory_arena: bool,
    /// Idle ONNX Runtime threads sleep instead of spinning.
    #[arg(long)]
    no_spin: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

/// `--ood`: whether images beyond the file's out-of-distribution threshold are `unknown`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OodSwitch {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image files, folders (their images, sub-folders included) or glob patterns.
    #[arg(required = true)]
    inputs: Vec<String>,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Classes listed per image.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// Below this confidence the label is `unknown`.
    #[arg(long, default_value_t = 0.0)]
    threshold: f32,
    /// `on`: an image whose `ood_score` is above the file's threshold (it looks like none of the
    /// training photos) is `unknown`, reason `out_of_distribution`; `off`: as a file without
    /// the output. Files without it are unaffected.
    #[arg(long, value_enum, default_value = "on")]
    ood: OodSwitch,
    /// Images per inference batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to bind (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Port of the gRPC endpoint (KServe v2 / Open Inference Protocol; 0: any free port).
    #[arg(long, default_value_t = 8081, conflicts_with = "no_grpc")]
    grpc_port: u16,
    /// No gRPC endpoint.
    #[arg(long)]
    no_grpc: bool,
    /// Serve HTTPS and gRPC over TLS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Let web pages from this origin call the server (CORS; repeat for several; `*`: any).
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// ONNX Runtime sessions serving the queue (each with --threads threads).
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Most images per batch. On 2 CPU cores ONNX Runtime runs no faster per image in larger
    /// batches (41 img/s at 1 and at 16) and its arena keeps the largest batch resident; raise it
    /// on a GPU or a many-core machine.
    #[arg(long, default_value_t = BatchConfig::DEFAULT_MAX_BATCH)]
    max_batch: usize,
    /// Longest a batch waits for more requests, milliseconds.
    #[arg(long, default_value_t = BatchConfig::DEFAULT_MAX_DELAY_MS)]
    max_delay_ms: u64,
    /// Most requests waiting for a session; one more gets 503 with Retry-After.
    #[arg(long, default_value_t = BatchConfig::DEFAULT_MAX_QUEUE)]
    max_queue: usize,
    /// Most inference requests in the server at once (reading, decoding, queued, running); one
    /// more gets 503 with Retry-After without being decoded.
    #[arg(long, default_value_t = ServeConfig::DEFAULT_MAX_INFLIGHT)]
    max_inflight: usize,
    /// Most images decoded at once [default: one per core].
    #[arg(long)]
    max_decodes: Option<usize>,
    /// Most images in one request.
    #[arg(long, default_value_t = ServeConfig::DEFAULT_MAX_IMAGES)]
    max_images: usize,
    /// Seconds a client may take to send a request's headers.
    #[arg(long, default_value_t = 10)]
    header_timeout_s: u64,
    /// Seconds a client may pause while sending a request body.
    #[arg(long, default_value_t = 10)]
    body_timeout_s: u64,
    /// Seconds a whole request may take, body, decoding, queue and inference included.
    #[arg(long, default_value_t = 60)]
    request_timeout_s: u64,
    /// Most connections open at once on each port (HTTP, gRPC); a full port closes its oldest
    /// silent (else longest idle) connection for a new one, or the new one when all are active.
    /// Lowered where the open-files limit (raised to its hard limit at start) would not hold
    /// both ports' and the process's own files.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Seconds a connection may go with nothing read or written before it is closed (a client
    /// that stopped sending, or stopped reading its answer; HTTP/2 clients answer the server's
    /// keepalive pings, every 20 s, and so stay open while idle).
    #[arg(long, default_value_t = 90)]
    idle_timeout_s: u64,
    /// Seconds the requests in flight get to finish after SIGTERM/Ctrl-C.
    #[arg(long, default_value_t = 60)]
    shutdown_timeout_s: u64,
    /// Seconds a decoded request may wait for its answer (queue and inference); then 503.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// Largest request body, MiB.
    #[arg(long, default_value_t = 16)]
    max_body_mib: usize,
    /// Require `Authorization: Bearer TOKEN` (health endpoints and the page stay open).
    #[arg(long, env = "FOOTWEAR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    threshold: f32,
    /// `on`: images beyond the file's out-of-distribution threshold are answered `unknown`
    /// (and v2/gRPC list its `ood_score` output); `off`: served as a file without it.
    #[arg(long, value_enum, default_value = "on")]
    ood: OodSwitch,
}

/// `serving`: a server's batch sizes vary, so it keeps no memory pattern per input shape.
fn session_config(m: &ModelArgs, serving: bool) -> SessionConfig {
    SessionConfig {
        threads: m.threads,
        ort_lib: m.ort_lib.clone(),
        cuda: m.device == Device::Cuda,
        require_cuda: m.require_cuda,
        no_arena: m.no_memory_arena,
        no_spin: m.no_spin,
        no_memory_pattern: serving,
        optimized_model: None,
    }
}

fn load(m: &ModelArgs, serving: bool) -> anyhow::Result<OnnxModel> {
    let t = Instant::now();
    let model = OnnxModel::load(&m.model, &session_config(m, serving))?;
    tracing::info!(
        "{}: model `{}` v{} ({}), {} classes, {} px, execution provider {}, loaded in {:.0} ms",
        m.model.display(),
        model.info.description.name,
        model.info.model_version,
        model.info.precision,
        model.classes().len(),
        model.input_size(),
        model.provider,
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(model)
}

/// Expands files, folders and globs into a list of files (folders: their images and those of
/// their sub-folders, sorted).
fn expand(inputs: &[String]) -> (Vec<PathBuf>, Vec<(String, String)>) {
    let (mut files, mut errors) = (Vec::new(), Vec::new());
    for i in inputs {
        let p = Path::new(i);
        if p.is_dir() {
            match image_files(p) {
                Ok(found) => files.extend(found),
                Err(e) => errors.push((i.clone(), e.to_string())),
            }
        } else if p.exists() {
            files.push(p.to_path_buf());
        } else if i.contains(['*', '?', '[']) {
            match glob::glob(i) {
                Ok(paths) => {
                    let before = files.len();
                    files.extend(paths.filter_map(Result::ok).filter(|p| p.is_file()));
                    if files.len() == before {
                        errors.push((i.clone(), "the pattern matches no file".into()));
                    }
                }
                Err(e) => errors.push((i.clone(), format!("bad pattern: {e}"))),
            }
        } else {
            errors.push((i.clone(), "no such file or folder".into()));
        }
    }
    (files, errors)
}

fn predict(a: &PredictArgs) -> anyhow::Result<ExitCode> {
    let mut model = load(&a.model, false)?;
    let (files, mut errors) = expand(&a.inputs);
    let classes = model.classes().to_vec();
    let t0 = Instant::now();
    let r = predict_files(&mut model, &files, a.batch)?;
    let results: Vec<(String, Answer)> = r
        .predicted
        .iter()
        .map(|(f, p)| {
            let ood = OodCheck::of(p.ood_score, model.info.ood.as_ref(), a.ood == OodSwitch::On);
            (f.display().to_string(), answer(&p.probabilities, &classes, a.top_k, a.threshold, ood))
        })
        .collect();
    let with_ood = model.info.ood.is_some() && a.ood == OodSwitch::On;
    errors.extend(r.failed.iter().map(|(f, e)| (f.display().to_string(), e.to_string())));
    let secs = t0.elapsed().as_secs_f64();
    for (f, e) in &errors {
        eprintln!("error: {f}: {e}");
    }
    match a.format {
        Format::Table => {
            let w = results.iter().map(|(f, _)| f.len()).max().unwrap_or(4).max(4);
            let ood_head = if with_ood { format!("  {:>9}", "ood_score") } else { String::new() };
            println!("{:<w$}  {:<10}  {:>10}{ood_head}  top {}", "file", "label", "confidence", a.top_k);
            for (f, r) in &results {
                let top: Vec<String> = r.top_k.iter().map(|t| format!("{} {:.3}", t.label, t.probability)).collect();
                let ood = r.ood_score.map(|s| format!("  {s:>9.3}")).unwrap_or_default();
                let why = match r.reason {
                    Some(inference::answer::OUT_OF_DISTRIBUTION) => format!(
                        "  (out of distribution: score {:.2} > {:.2}; this does not look like {})",
                        r.ood_score.unwrap_or(f32::NAN),
                        r.ood_threshold.unwrap_or(f32::NAN),
                        inference::answer::class_list(&classes)
                    ),
                    Some(other) => format!("  ({})", other.replace('_', " ")),
                    None => String::new(),
                };
                println!("{f:<w$}  {:<10}  {:>10.4}{ood}  {}{why}", r.label, r.confidence, top.join(", "));
            }
        }
        Format::Json => {
            let preds: Vec<serde_json::Value> = results
                .iter()
                .map(|(f, r)| {
                    let mut v = serde_json::to_value(r).expect("serializable");
                    v["file"] = serde_json::json!(f);
                    v
                })
                .collect();
            let errs: Vec<serde_json::Value> =
                errors.iter().map(|(f, e)| serde_json::json!({"file": f, "error": e})).collect();
            let ood = model.info.ood.as_ref().filter(|_| with_ood).map(|o| o.threshold);
            let out = serde_json::json!({
                "model": {"name": model.info.description.name, "version": model.info.model_version, "ood_threshold": ood},
                "predictions": preds,
                "errors": errs,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Csv => {
            println!("file,label,confidence,top_k,reason,ood_score,ood_threshold");
            for (f, r) in &results {
                let top: Vec<String> = r.top_k.iter().map(|t| format!("{}:{:.4}", t.label, t.probability)).collect();
                let quoted = format!("\"{}\"", f.replace('"', "\"\""));
                let num = |v: Option<f32>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
                println!(
                    "{quoted},{},{:.6},{},{},{},{}",
                    r.label,
                    r.confidence,
                    top.join(";"),
                    r.reason.unwrap_or_default(),
                    num(r.ood_score),
                    num(r.ood_threshold)
                );
            }
        }
    }
    let far = results.iter().filter(|(_, r)| r.reason == Some(inference::answer::OUT_OF_DISTRIBUTION)).count();
    tracing::info!(
        "{} images predicted in {:.2} s ({:.1} images/s), {} errors{}",
        results.len(),
        secs,
        results.len() as f64 / secs.max(1e-9),
        errors.len(),
        if with_ood { format!(", {far} out of distribution (`unknown`)") } else { String::new() }
    );
    Ok(if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: finishing the requests in flight");
}

fn serve(a: &ServeArgs) -> anyhow::Result<ExitCode> {
    // A long-running server trades a little speed for a resident size that does not ratchet up.
    tune_malloc();
    for (flag, v) in [
        ("--sessions", a.sessions),
        ("--max-batch", a.max_batch),
        ("--max-queue", a.max_queue),
        ("--max-inflight", a.max_inflight),
        ("--max-images", a.max_images),
        ("--max-decodes", a.max_decodes.unwrap_or(1)),
        ("--max-connections", a.max_connections),
        ("--idle-timeout-s", a.idle_timeout_s as usize),
        ("--header-timeout-s", a.header_timeout_s as usize),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if a.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        bail!("--token (or FOOTWEAR_TOKEN) is empty: an empty token would protect nothing; give a secret or leave it unset");
    }
    let load_all = {
        let (m, n) = (a.model.clone(), a.sessions);
        move |path: &Path| -> anyhow::Result<Vec<OnnxModel>> {
            let m = ModelArgs { model: path.to_path_buf(), ..m.clone() };
            (0..n).map(|_| load(&m, true)).collect()
        }
    };
    let sessions = load_all(&a.model.model)?;
    let cfg = ServeConfig {
        batch: BatchConfig {
            max_batch: a.max_batch,
            max_delay: Duration::from_millis(a.max_delay_ms),
            max_queue: a.max_queue,
        },
        max_inflight: a.max_inflight,
        max_images: a.max_images,
        timeout: Duration::from_secs(a.timeout_s),
        body_timeout: Duration::from_secs(a.body_timeout_s),
        request_timeout: Duration::from_secs(a.request_timeout_s),
        max_body_bytes: a.max_body_mib << 20,
        token: a.token.clone(),
        top_k: a.top_k,
        threshold: a.threshold,
        ood: a.ood == OodSwitch::On,
        cors_origins: a.cors_origins.clone(),
        ..ServeConfig::default()
    };
    let cfg = ServeConfig { max_decodes: a.max_decodes.unwrap_or(cfg.max_decodes), ..cfg };
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some((server::tls_acceptor(cert, key)?, std::fs::read(cert)?, std::fs::read(key)?)),
        _ => None,
    };
    // Each port's connections capped below the open-files limit, with room for the model file,
    // ONNX Runtime's, the log and the listening sockets (128).
    let files = runtime::conn::raise_file_limit();
    let per_port = runtime::conn::connections_per_port(a.max_connections, files, 2, 128);
    if per_port < a.max_connections {
        tracing::warn!(
            "--max-connections {} lowered to {per_port} per port: the open-files limit is {} (ulimit -n)",
            a.max_connections,
            files.unwrap_or_default()
        );
    }
    let limits = runtime::conn::Limits {
        max_connections: per_port,
        first_bytes: Duration::from_secs(a.header_timeout_s),
        idle: Duration::from_secs(a.idle_timeout_s),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        // Warm-up runs before the port opens: readiness is never true for a cold model.
        let state = server::state(sessions, a.model.model.clone(), std::sync::Arc::new(load_all), cfg)?;
        let app = server::app(state.clone())?;
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        tokio::spawn(reload_on_sighup(state.clone()));
        tokio::spawn(give_back_memory());
        let admission = |port: &'static str| {
            use runtime::metrics::{CLOSED_FOR_NEWER, CLOSED_FULL};
            let m = state.metrics();
            runtime::conn::Admission::new(
                port,
                limits,
                m.connections_closed(port, CLOSED_FULL),
                m.connections_closed(port, CLOSED_FOR_NEWER),
            )
        };
        let grpc = if a.no_grpc {
            None
        } else {
            let gaddr = format!("{}:{}", a.host, a.grpc_port);
            let gl = tokio::net::TcpListener::bind(&gaddr)
                .await
                .with_context(|| format!("binding {gaddr} (gRPC; --grpc-port, --no-grpc)"))?;
            let local = gl.local_addr()?;
            // gRPC messages are read whole before a handler runs: the token is checked and an
            // inference permit taken (at most --max-inflight calls, the rest refused at once)
            // on the headers, before the message is read (grpc::Gate; health and metadata take
            // no permit), at most 16 streams per connection, so that many calls cannot each
            // hold a message in memory.
            // Connections: capped and closed when silent or idle (runtime::conn), pinged every
            // 20 s and closed when a ping goes 10 s unanswered, a TLS handshake within the
            // header timeout.
            let mut builder = tonic::transport::Server::builder()
                .timeout(Duration::from_secs(a.request_timeout_s))
                .max_concurrent_streams(16)
                .http2_keepalive_interval(Some(Duration::from_secs(20)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .layer(runtime::grpc::Gate::new(a.token.as_deref(), a.max_inflight, a.max_body_mib << 20));
            let scheme = if let Some((_, cert, key)) = &tls {
                let identity = tonic::transport::Identity::from_pem(cert, key);
                let tls_config = tonic::transport::ServerTlsConfig::new()
                    .identity(identity)
                    .timeout(Duration::from_secs(a.header_timeout_s));
                builder = builder.tls_config(tls_config)?;
                "grpcs"
            } else {
                "grpc"
            };
            tracing::info!("gRPC (KServe v2) on {scheme}://{local}");
            let router = builder.add_service(runtime::grpc::service(state.clone()));
            let admission = admission("grpc");
            let incoming = runtime::conn::Incoming::new(gl, admission);
            Some(tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()))))
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(
            "serving on {scheme}://{} (web page at /, POST /v1/predict, /v2, /metrics, /openapi.json)",
            listener.local_addr()?
        );
        let conn = server::ConnConfig {
            header_timeout: Duration::from_secs(a.header_timeout_s),
            shutdown_deadline: Duration::from_secs(a.shutdown_timeout_s),
        };
        server::serve(listener, app, stopped(stop_rx), conn, admission("http"), tls.map(|t| t.0)).await?;
        if let Some(g) = grpc {
            g.await?.context("gRPC server")?;
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Each SIGHUP reloads the model file (see `AppState::reload`; a refused file is logged and the
/// old model keeps serving).
async fn reload_on_sighup(state: std::sync::Arc<server::AppState>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading {}", state.current().file.display());
        let _ = state.reload(true).await;
    }
}

fn info(m: &ModelArgs) -> anyhow::Result<ExitCode> {
    let model = load(m, false)?;
    let i = &model.info;
    let out = serde_json::json!({
        "file": m.model.display().to_string(),
        "name": i.description.name,
        "version": i.model_version,
        "classes": i.description.classes,
        "input_size": i.description.input_size,
        "input_type": i.input_type,
        "preprocessing": i.preprocessing,
        "metrics": i.description.metrics,
        "source": i.description.source,
        "toolchain": i.toolchain,
        "precision": i.precision,
        "calibration": i.calibration,
        "int8_weight_bits": i.int8_weight_bits(),
        "test_time_augmentation": i.test_time_augmentation,
        "ood": i.ood,
        "ood_score_output": model.has_ood_score,
        "execution_provider": model.provider,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

/// glibc keeps freed memory for reuse and raises its mmap threshold after large frees, so a
/// server's resident size ratchets up to its largest batch's activations and stays there. A
/// fixed 1 MiB threshold makes every large tensor (ONNX Runtime allocates through malloc) an mmap
/// returned to the system when freed, and two malloc arenas bound per-thread fragmentation.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's tuning parameters; called before the sessions and the
    // async runtime start their threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// The process's resident size, bytes (`/proc/self/statm`); `None` where it cannot be read.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Gives memory freed after a spike back to the system. `tune_malloc` returns large blocks as
/// they are freed, but a crafted request leaves millions of small ones (parsed headers, JSON,
/// protobuf) scattered over glibc's heaps, which keep their pages: every 5 s, when the resident
/// size has grown 8 MiB beyond its level after the last trim, `malloc_trim(0)` releases every
/// whole free page of every arena (measured in docs/reliability.md).
async fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let Some(mut floor) = resident_bytes() else { return };
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(now) = resident_bytes() else { return };
            if now < floor + (8 << 20) {
                floor = floor.min(now);
                continue;
            }
            // SAFETY: malloc_trim only returns free pages; it takes the arenas' locks itself.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
            let after = resident_bytes().unwrap_or(now);
            tracing::debug!("memory: resident {} MiB, {} MiB after malloc_trim", now >> 20, after >> 20);
            floor = after;
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Predict(a) => predict(a),
        Cmd::Serve(a) => serve(a),
        Cmd::Info(m) => info(m),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
