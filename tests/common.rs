//! Shared set-up of the end-to-end tests: a small footwear model trained, exported and served
//! once per test binary.

use candle_core::Device;
use std::path::PathBuf;
use std::sync::OnceLock;
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
            image_size: 96,
            variants: 1,
            batch_size: 16,
            feature_cache: "".into(),
            ..Default::default()
        };
        cfg.fine_tune.epochs = 0;
        cfg.head.epochs = 25;
        let outcome = trainer::train::run(&cfg, false, &Device::Cpu).expect("training the small model");
        let onnx = dir.join("model.onnx");
        let o = exporter::ExportOptions {
            run_dir: cfg.out.clone(),
            out: onnx.clone(),
            precision: exporter::graph::OnnxPrecision::F32,
            input_type: modelspec::onnx_meta::InputType::Uint8,
            model_version: 7,
            verify: true,
            samples: vec![],
            max_samples: 3,
            candle_onnx: false,
            tolerance: 1e-4,
            ort: inference::SessionConfig { threads: 2, ort_lib: Some(ort_lib()), ..Default::default() },
        };
        exporter::export(&o).expect("exporting the small model");
        Trained { dir, onnx, data, test_accuracy: outcome.test.accuracy }
    })
}
