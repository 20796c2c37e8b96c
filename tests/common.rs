//! Shared set-up of the end-to-end tests: a small footwear model trained, exported and served
//! once per test binary.

use candle_core::Device;
use reqwest::blocking::Client;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
pub use testkit::{repo, test_photos};

/// The ONNX Runtime library installed by scripts/setup-onnxruntime.sh.
pub fn ort_lib() -> PathBuf {
    let lib = inference::ortlib::installed(&repo());
    assert!(lib.exists(), "{} is missing: run scripts/setup-onnxruntime.sh first", lib.display());
    lib
}

/// The `footwear` binary, built by scripts/test.sh before the tests run.
pub fn footwear_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"));
    let bin = target.join("release/footwear");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p runtime` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A small footwear model (head only, 96 px, 30 photos per class), exported to ONNX; built once.
pub struct Trained {
    pub dir: PathBuf,
    pub onnx: PathBuf,
    pub data: PathBuf,
    pub test_accuracy: f64,
}

pub fn trained() -> &'static Trained {
    static T: OnceLock<Trained> = OnceLock::new();
    T.get_or_init(|| {
        let dir = testkit::tmp("e2e", "chain");
        let data = dir.join("data");
        testkit::link_subset(&testkit::footwear(), &data, 30).unwrap();
        let mut cfg = trainer::config::TrainConfig {
            data: data.clone(),
            base: testkit::weights("xception-imagenet"),
            out: dir.join("run"),
            image_size: 96.into(),
            variants: 1.into(),
            name: "footwear".into(),
            batch_size: 16,
            feature_cache: "".into(),
            ..Default::default()
        };
        cfg.fine_tune.epochs = 0.into();
        cfg.head.epochs = 25.into();
        let outcome = trainer::train::run(&cfg, false, &Device::Cpu).expect("training the small model");
        let onnx = dir.join("model.onnx");
        export(&cfg.out, &onnx, 7, false);
        Trained { dir, onnx, data, test_accuracy: outcome.test.as_ref().expect("the test split is evaluated").accuracy }
    })
}

/// Exports (and verifies) a trained run as `out`, with `model_version` in its metadata.
pub fn export(run_dir: &Path, out: &Path, model_version: i64, flip_average: bool) {
    exporter::export(&export_options(run_dir, out, model_version, flip_average)).expect("exporting the small model");
}

/// How the tests export: float32, uint8 input, verified through ONNX Runtime on 3 samples.
pub fn export_options(run_dir: &Path, out: &Path, model_version: i64, flip_average: bool) -> exporter::ExportOptions {
    exporter::ExportOptions {
        run_dir: run_dir.to_path_buf(),
        out: out.to_path_buf(),
        precision: exporter::graph::OnnxPrecision::F32,
        input_type: modelspec::onnx_meta::InputType::Uint8,
        model_version,
        verify: true,
        samples: vec![],
        max_samples: 3,
        candle_onnx: false,
        tolerance: 1e-4,
        flip_average,
        ood_rejection: Some(exporter::ood::DEFAULT_REJECTION),
        ort: inference::SessionConfig { threads: 2, ort_lib: Some(ort_lib()), ..Default::default() },
    }
}

/// A copy of the exported file `src` at `dst` whose out-of-distribution threshold is
/// `threshold` (0: every image is out of distribution), the graph unchanged.
pub fn with_ood_threshold(src: &Path, dst: &Path, threshold: f32) {
    use prost::Message;
    let mut m = candle_onnx::onnx::ModelProto::decode(std::fs::read(src).unwrap().as_slice()).unwrap();
    let key = modelspec::onnx_meta::OOD;
    let meta = m.metadata_props.iter().find(|p| p.key == key).expect("the file has an ood threshold");
    let mut ood: modelspec::onnx_meta::OodMeta = serde_json::from_str(&meta.value).unwrap();
    ood.threshold = threshold;
    exporter::ood::put_meta(&mut m, &ood).unwrap();
    std::fs::write(dst, m.encode_to_vec()).unwrap();
}

/// A running `footwear serve`, stopped with SIGTERM on drop.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT` (`https://` with --tls-cert).
    pub url: String,
    /// `127.0.0.1:PORT` of the gRPC endpoint, unless --no-grpc.
    pub grpc: Option<String>,
}

impl Server {
    pub fn start(onnx: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(footwear_bin())
            .args(["serve", "--port", "0", "--threads", "2", "-m"])
            .arg(onnx)
            .args(if extra.contains(&"--max-delay-ms") { &[][..] } else { &["--max-delay-ms", "10"][..] })
            .arg("--ort-lib")
            .arg(ort_lib())
            .args(if extra.contains(&"--no-grpc") { &[][..] } else { &["--grpc-port", "0"][..] })
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
                for scheme in ["http", "https", "grpc", "grpcs"] {
                    let at = format!("{scheme}://127.0.0.1:");
                    if let Some(i) = line.find(&at) {
                        let port: String = line[i + at.len()..].chars().take_while(char::is_ascii_digit).collect();
                        let _ = tx.send((scheme, port));
                    }
                }
            }
        });
        let mut grpc = None;
        loop {
            let (scheme, port) = rx.recv_timeout(Duration::from_secs(60)).expect("the server did not start");
            match scheme {
                "grpc" | "grpcs" => grpc = Some(format!("127.0.0.1:{port}")),
                _ => return Server { child, url: format!("{scheme}://127.0.0.1:{port}"), grpc },
            }
        }
    }

    /// SIGTERM, then the exit status (graceful shutdown).
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

pub fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// Status and JSON body; every answer of the server is JSON except `/` and `/metrics`.
pub fn json(r: reqwest::blocking::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
}
