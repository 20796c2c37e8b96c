//! The exporter end to end, with the real weights and ONNX Runtime 1.31 (scripts/test.sh
//! installs both): the Keras kitchenware model against TensorFlow's logits, a small trained
//! footwear model against the trainer's own test accuracy, the ONNX checker, and bad inputs.

use candle_core::{Device, Tensor};
use exporter::graph::OnnxPrecision;
use exporter::{export, triton, ExportOptions};
use inference::{OnnxModel, SessionConfig};
use modelspec::onnx_meta::InputType;
use std::path::Path;
use std::process::Command;
use testkit::{repo, weights};

fn tmp(name: &str) -> std::path::PathBuf {
    testkit::tmp("exporter-test", name)
}

/// Accuracy of `onnx` through ONNX Runtime on a labelled folder.
fn evaluate(onnx: &Path, folder: &Path, ort: &SessionConfig) -> inference::evaluate::Evaluation {
    let mut m = OnnxModel::load(onnx, ort).unwrap();
    inference::evaluate::evaluate(&mut m, folder).unwrap()
}

/// ONNX Runtime as scripts/setup-onnxruntime.sh installs it.
fn ort() -> SessionConfig {
    let lib = inference::ortlib::installed(&repo());
    assert!(lib.exists(), "{} is missing: run scripts/setup-onnxruntime.sh first", lib.display());
    SessionConfig { threads: 2, ort_lib: Some(lib), ..Default::default() }
}

fn options(run_dir: &Path, out: &Path) -> ExportOptions {
    ExportOptions {
        run_dir: run_dir.into(),
        out: out.into(),
        precision: OnnxPrecision::F32,
        input_type: InputType::Uint8,
        model_version: 1,
        verify: true,
        samples: vec![],
        max_samples: 6,
        candle_onnx: true,
        tolerance: 1e-4,
        ort: ort(),
        flip_average: false,
        ood_rejection: Some(exporter::ood::DEFAULT_REJECTION),
    }
}

/// `onnx.checker.check_model(full_check=True)` with the Python `onnx` of .local/python.
fn onnx_check(path: &Path) {
    let py = repo().join(".local/python");
    assert!(py.exists(), "{} is missing: run scripts/setup-onnxruntime.sh first", py.display());
    let out = Command::new("python3")
        .env("PYTHONPATH", &py)
        .args([
            "-c",
            "import onnx, sys; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True); print('ok')",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "onnx.checker: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn kitchenware_model_from_keras_gives_tensorflow_logits_through_onnx_runtime() {
    let dir = tmp("kitchenware");
    let out = dir.join("kitchenware.onnx");
    let e = export(&options(&weights("kitchenware"), &out)).unwrap();
    let r = e.report.unwrap();
    assert!(r.passed, "{r}");
    assert!(r.engines.iter().all(|e| e.max_abs_diff_logits.is_some_and(|d| d <= 1e-4)), "{r}");
    assert!(e.report_path.unwrap().exists());
    onnx_check(&out);

    // 'Same' pooling is four padded MaxPools (no Pad nodes); candle-onnx, which verified the file
    // above, read it as reflect Pads + unpadded MaxPools.
    use prost::Message;
    let model = candle_onnx::onnx::ModelProto::decode(std::fs::read(&out).unwrap().as_slice()).unwrap();
    let count = |m: &candle_onnx::onnx::ModelProto, op: &str| {
        m.graph.as_ref().unwrap().node.iter().filter(|n| n.op_type == op).count()
    };
    let padded_pools = model.graph.as_ref().unwrap().node.iter().filter(|n| {
        n.op_type == "MaxPool" && n.attribute.iter().any(|a| a.name == "pads" && a.ints.iter().any(|&p| p > 0))
    });
    assert_eq!((padded_pools.count(), count(&model, "Pad")), (4, 0));
    let rewritten = exporter::graph::with_explicit_pads(model);
    assert_eq!((count(&rewritten, "Pad"), count(&rewritten, "MaxPool")), (4, 4));

    // TensorFlow's inputs are x/127.5 - 1 of uint8 pixels: exactly invertible.
    let fx = testkit::fixtures().join("kitchenware");
    let x = Tensor::read_npy(fx.join("inputs_150.npy")).unwrap();
    let want = Tensor::read_npy(fx.join("logits.npy")).unwrap();
    let n = x.dim(0).unwrap();
    let pixels: Vec<u8> = x
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
        .collect();
    let mut m = OnnxModel::load(&out, &ort()).unwrap();
    assert_eq!(m.classes(), ["cup", "fork", "glass", "knife", "plate", "spoon"]);
    assert_eq!(m.input_size(), 150);
    let got = m.run(pixels, n).unwrap();
    let want = want.to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.logits.iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
        let s: f32 = g.probabilities.iter().sum();
        assert!((s - 1.0).abs() < 1e-5);
    }
    assert!(worst <= 1e-3, "max |ONNX Runtime - TensorFlow| = {worst}");
    println!("kitchenware: ONNX Runtime vs TensorFlow logits, max |diff| {worst:.2e}");
}

#[test]
fn small_trained_model_exports_with_the_trainers_accuracy_and_a_triton_layout() {
    let root = tmp("trained");
    let data = root.join("data");
    testkit::link_subset(&testkit::footwear(), &data, 6).unwrap();
    let mut cfg = trainer::config::TrainConfig {
        data: data.clone(),
        base: weights("xception-imagenet"),
        out: root.join("run"),
        image_size: 71.into(),
        variants: 1.into(),
        fine_tune_from: 14,
        batch_size: 6,
        feature_cache: "".into(),
        name: "footwear".into(),
        ..Default::default()
    };
    cfg.head.epochs = 3.into();
    cfg.fine_tune.epochs = 1.into();
    let outcome = trainer::train::run(&cfg, false, &Device::Cpu).unwrap();

    let out = root.join("model.onnx");
    let e = export(&options(&cfg.out, &out)).unwrap();
    let r = e.report.clone().unwrap();
    assert!(r.passed, "{r}");
    // The out-of-distribution output, checked on both engines against the Candle features'
    // scores, its threshold set on the 18 validation photos.
    assert!(r.engines.iter().all(|e| e.max_rel_diff_ood_score.is_some_and(|d| d <= 1e-3)), "{r}");
    let ood = e.ood.clone().unwrap();
    assert_eq!((ood.method.as_str(), ood.photos, ood.rejection_rate), ("mahalanobis_l2", 18, 0.01));
    assert_eq!(ood.fitted_on, [6, 6, 6]);
    // The samples came from the run's own test split (its model.json names the data).
    assert!(r.samples.iter().all(|s| s.contains("/test/")), "{:?}", r.samples);
    assert_eq!(r.engines.len(), 2, "ONNX Runtime and candle-onnx");
    onnx_check(&out);

    let ev = evaluate(&out, &data.join("test"), &ort());
    assert_eq!(ev.images, 18);
    let test_accuracy = outcome.test.as_ref().unwrap().accuracy;
    assert_eq!(ev.accuracy, test_accuracy, "ONNX Runtime vs trainer test accuracy");
    assert_eq!(ev.reported_accuracy, Some(test_accuracy));

    // The metadata alone describes the model.
    let m = OnnxModel::load(&out, &ort()).unwrap();
    assert_eq!(m.classes(), ["boot", "sandal", "shoe"]);
    assert_eq!(m.input_size(), 71);
    assert!(m.info.preprocessing.scaling_in_graph);
    assert!(m.info.toolchain.starts_with("footwear-exporter"));
    assert_eq!(m.info.ood.as_ref(), Some(&ood));
    assert!(m.has_ood_score);
    // The validation photos' own scores set it: at most one of the 18 is above it (1% of 18).
    assert!(ood.rejected <= 1.0 / 18.0 + 1e-9, "{ood:?}");
    assert!(ev.ood.is_some(), "{ev}");
    drop(m);
    // Without it (--no-ood): no output, no metadata, as files written before it.
    let plain = root.join("model-plain.onnx");
    let ep = export(&ExportOptions { ood_rejection: None, ..options(&cfg.out, &plain) }).unwrap();
    assert!(ep.ood.is_none() && ep.report.as_ref().unwrap().tolerance_ood_score.is_none());
    let m = OnnxModel::load(&plain, &ort()).unwrap();
    assert!(!m.has_ood_score && m.info.ood.is_none());
    assert!(e.bytes - ep.bytes >= 4 * 2048 * 2048, "{} vs {}", e.bytes, ep.bytes);
    drop(m);

    let desc = modelspec::ModelDescription::load(&cfg.out).unwrap();
    let t = triton::write(&root.join("triton"), &desc, &out, 16, false, e.ood.is_some()).unwrap();
    assert_eq!(std::fs::read(t.join("1/model.onnx")).unwrap(), std::fs::read(&out).unwrap());
    let config = std::fs::read_to_string(t.join("config.pbtxt")).unwrap();
    for want in [
        "name: \"footwear\"",
        "max_batch_size: 16",
        "TYPE_UINT8",
        "dims: [ 71, 71, 3 ]",
        "dynamic_batching",
        "name: \"ood_score\" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] }",
    ] {
        assert!(config.contains(want), "config.pbtxt lacks {want}:\n{config}");
    }
    assert_eq!(std::fs::read_to_string(t.join("labels.txt")).unwrap(), "boot\nsandal\nshoe\n");

    // Float16 weights: half the size, same answers within float16 rounding.
    let out16 = root.join("model16.onnx");
    let o16 = ExportOptions { precision: OnnxPrecision::F16, tolerance: 5e-2, ..options(&cfg.out, &out16) };
    let e16 = export(&o16).unwrap();
    assert!(e16.report.as_ref().unwrap().passed, "{}", e16.report.unwrap());
    assert!(e16.report.as_ref().unwrap().engines[0].max_rel_diff_ood_score.is_some());
    assert!(e16.ood.is_some());
    assert!(e16.bytes < e.bytes * 6 / 10, "{} vs {}", e16.bytes, e.bytes);
    onnx_check(&out16);

    // Float32 input (already scaled), for float-only tools: same answers, the runtime scales.
    let outf = root.join("model-float.onnx");
    let ef = export(&ExportOptions { input_type: InputType::Float32, ..options(&cfg.out, &outf) }).unwrap();
    let rf = ef.report.unwrap();
    assert!(rf.passed && rf.engines.iter().all(|e| e.max_abs_diff_logits.is_some()), "{rf}");
    onnx_check(&outf);
    let evf = evaluate(&outf, &data.join("test"), &ort());
    assert_eq!(evf.accuracy, ev.accuracy);
    let m = OnnxModel::load(&outf, &ort()).unwrap();
    assert!(!m.info.preprocessing.scaling_in_graph);
    assert_eq!(m.info.precision, modelspec::onnx_meta::Precision::Float32);
    assert_eq!(m.info.test_time_augmentation, None);

    // Flip averaging in the graph: the Candle model's mean logits over each photo and its
    // mirror image, and the predictions of `trainer eval --flip`.
    let outflip = root.join("model-flip.onnx");
    let ef = export(&ExportOptions { flip_average: true, ..options(&cfg.out, &outflip) }).unwrap();
    let rf = ef.report.unwrap();
    assert!(rf.engines[0].passed && rf.engines[0].max_abs_diff_logits.is_some_and(|d| d <= 1e-4), "{rf}");
    assert!(rf.engines.iter().all(|e| e.max_rel_diff_ood_score.is_some_and(|d| d <= 1e-3)), "{rf}");
    let m = OnnxModel::load(&outflip, &ort()).unwrap();
    assert_eq!(m.info.test_time_augmentation.as_deref(), Some("flip"));
    assert!(m.has_ood_score);
    drop(m);
    let evflip = evaluate(&outflip, &data.join("test"), &ort());
    let o = trainer::eval::EvalOptions {
        run_dir: cfg.out.clone(),
        with: vec![],
        folders: vec![data.join("test")],
        split: None,
        only: None,
        engine: trainer::config::CacheEngine::Candle,
        ort_lib: None,
        batch: 6,
        flip: true,
        image_size: None,
    };
    let tf = &trainer::eval::evaluate(&o).unwrap()[0];
    assert_eq!(evflip.correct, (0..3).map(|c| tf.report.confusion[c][c]).sum::<usize>());

    int8_files(&cfg.out, &root, &e);
}

/// A run on class folders alone (splits carved by the trainer) with photos cropped to their
/// centre square: the exporter takes its verification photos from the run's carved test split
/// (splits.csv), calibrates int8 on its carved training photos, writes the crop into the
/// metadata, and ONNX Runtime, decoding as the runtime does, gives the trainer's test accuracy.
#[test]
fn a_carved_cropped_run_exports_from_its_own_splits() {
    let root = tmp("carved");
    let linked = root.join("linked");
    testkit::link_subset(&testkit::footwear(), &linked, 6).unwrap();
    let flat = root.join("shop-photos");
    for split in ["train", "validation", "test"] {
        for class in ["boot", "sandal", "shoe"] {
            std::fs::create_dir_all(flat.join(class)).unwrap();
            for f in std::fs::read_dir(linked.join(split).join(class)).unwrap() {
                let f = f.unwrap().path();
                let to = flat.join(class).join(format!("{split}-{}", f.file_name().unwrap().to_string_lossy()));
                std::os::unix::fs::symlink(std::fs::canonicalize(&f).unwrap(), to).unwrap();
            }
        }
    }
    let mut cfg = trainer::config::TrainConfig {
        data: flat.clone(),
        base: weights("xception-imagenet"),
        out: root.join("run"),
        image_size: 71.into(),
        resize: modelspec::Fit::Crop,
        variants: 1.into(),
        fine_tune_from: 14,
        batch_size: 6,
        feature_cache: "".into(),
        ..Default::default()
    };
    cfg.head.epochs = 3.into();
    cfg.fine_tune.epochs = 0.into();
    let outcome = trainer::train::run(&cfg, false, &Device::Cpu).unwrap();
    let rows = modelspec::splits::read(&cfg.out.join("splits.csv")).unwrap();
    let test: Vec<&modelspec::splits::SplitRow> =
        rows.iter().filter(|r| r.split == modelspec::splits::Split::Test).collect();
    assert_eq!(test.len(), 9, "15% of 18 photos per class, rounded: 3 each");

    let out = root.join("model.onnx");
    let e = export(&options(&cfg.out, &out)).unwrap();
    let r = e.report.unwrap();
    assert!(r.passed, "{r}");
    // Its samples are the carved test photos.
    let held_out: Vec<String> = test.iter().map(|r| flat.join(&r.path).display().to_string()).collect();
    assert!(r.samples.iter().all(|s| held_out.contains(s)), "{:?} not among {held_out:?}", r.samples);
    let m = OnnxModel::load(&out, &ort()).unwrap();
    assert_eq!(m.info.description.name, "shop-photos", "named after the data folder");
    assert_eq!(m.info.preprocessing.steps.fit, modelspec::Fit::Crop);
    drop(m);
    // ONNX Runtime on the carved test photos, each decoded and cropped as the runtime does.
    let by_class = root.join("held-out");
    for r in &test {
        std::fs::create_dir_all(by_class.join(&r.class)).unwrap();
        let src = flat.join(&r.path);
        std::os::unix::fs::symlink(
            std::fs::canonicalize(&src).unwrap(),
            by_class.join(&r.class).join(src.file_name().unwrap()),
        )
        .unwrap();
    }
    let ev = evaluate(&out, &by_class, &ort());
    assert_eq!(ev.images, 9);
    assert_eq!(ev.accuracy, outcome.test.as_ref().unwrap().accuracy, "ONNX Runtime vs trainer, cropped photos");

    // int8: calibrated on the carved training photos, verified on the carved test photos.
    let q = exporter::int8::Int8Options {
        calibration: exporter::calibrate::CalibrationOptions { count: 9, ..Default::default() },
        min_agreement: 0.5,
        max_accuracy_drop: 0.5,
        ..Default::default()
    };
    let (_, r) = exporter::int8::export_int8(&options(&cfg.out, &root.join("model.int8.onnx")), &q).unwrap();
    let r = r.unwrap();
    assert!(r.passed, "{r}");
    assert_eq!((r.images, r.calibration.photos), (9, 9));
    assert!(
        r.folder.contains("splits.csv") && r.calibration.source.contains("train split"),
        "{} / {}",
        r.folder,
        r.calibration.source
    );
    std::fs::remove_dir_all(root).unwrap();
}

/// int8: calibrated on the run's training photos through the Candle model, verified on its test
/// split against the float file; layers kept float; a failed check leaves the old file.
fn int8_files(run: &Path, root: &Path, float: &exporter::Exported) {
    use exporter::int8::{export_int8, Int8Options};
    let out = root.join("model.int8.onnx");
    let q = Int8Options {
        calibration: exporter::calibrate::CalibrationOptions { count: 12, ..Default::default() },
        // 18 test photos through a 71 px model (94% float accuracy): one photo is 5.6 points and
        // int8 rounding flips a few borderline ones. The full-size figures (224 px, 1,800
        // photos: 99.6% agreement, -0.2 points) are in docs/benchmarks.md.
        min_agreement: 0.6,
        max_accuracy_drop: 0.35,
        ..Default::default()
    };
    let (e, r) = export_int8(&options(run, &out), &q).unwrap();
    let r = r.unwrap();
    assert!(r.passed, "{r}");
    assert!(r.failed_attempts.is_empty(), "the first calibration passed, nothing else tried: {r}");
    assert_eq!((r.images, r.calibration.photos), (18, 12));
    assert_eq!(r.graph.quantized, 76, "74 convolutions and 2 dense layers");
    assert_eq!(r.graph.biases_clamped, 0);
    // ONNX Runtime fused every convolution into its integer kernel.
    assert_eq!(r.optimized_ops.get("QLinearConv"), Some(&74), "{:?}", r.optimized_ops);
    assert!(
        !r.optimized_ops.contains_key("Conv") && !r.optimized_ops.contains_key("FusedConv"),
        "{:?}",
        r.optimized_ops
    );
    // Both files carry the out-of-distribution fit in float32 (2048 x 2048 + 3 x 2048 values).
    let ood = 4 * (2048 * 2048 + 3 * 2048);
    assert!(e.ood.is_some() && float.ood.is_some());
    assert!(e.bytes - ood < (float.bytes - ood) * 3 / 10, "{} vs {}", e.bytes, float.bytes);
    assert!(root.join("model.int8.verification.json").exists());
    onnx_check(&out);
    let m = OnnxModel::load(&out, &ort()).unwrap();
    assert_eq!(m.info.precision, modelspec::onnx_meta::Precision::Int8);
    let c = m.info.calibration.as_ref().unwrap();
    assert_eq!((c["method"].as_str(), c["photos"].as_u64()), (Some("minmax"), Some(12)));
    assert_eq!((m.info.int8_weight_bits(), c["weight_bits"].as_u64()), (Some(7), Some(7)));
    // Its own threshold, set on its own scores of the validation photos.
    let o = m.info.ood.clone().unwrap();
    assert!(m.has_ood_score && o.threshold.is_finite() && o.photos == 18, "{o:?}");
    assert!(o.set_on.contains("validation"), "{o:?}");
    assert_eq!(r.ood.as_ref(), Some(&o));
    drop(m);

    // A layer kept float stays a float convolution in ONNX Runtime's graph.
    let kept = root.join("model.int8-kept.onnx");
    let qk = Int8Options { keep_float: vec!["block1_conv1".into()], ..q.clone() };
    let (_, rk) = export_int8(&options(run, &kept), &qk).unwrap();
    let rk = rk.unwrap();
    assert!(rk.passed, "{rk}");
    assert_eq!((rk.graph.quantized, rk.graph.kept_float.clone()), (75, vec!["block1_conv1".to_string()]));
    assert_eq!(rk.optimized_ops.get("QLinearConv"), Some(&73), "{:?}", rk.optimized_ops);

    // A check that fails names itself and leaves the previous file as it was, after the other
    // calibration method was tried too (and failed the same impossible limit).
    let before = std::fs::read(&out).unwrap();
    let strict = Int8Options { min_agreement: 1.01, ..q.clone() };
    let err = format!("{:#}", export_int8(&options(run, &out), &strict).unwrap_err());
    assert!(err.contains("[FAILED] same top class as the float32 file"), "{err}");
    assert!(err.contains("fails its verification with minmax and with percentile"), "{err}");
    assert_eq!(err.matches("int8 verification of").count(), 2, "{err}");
    assert!(err.contains("left unchanged"), "{err}");
    let once = Int8Options { fallback: false, ..strict };
    let err = format!("{:#}", export_int8(&options(run, &out), &once).unwrap_err());
    assert!(err.contains("fails its verification with minmax;"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    let unknown = Int8Options { keep_float: vec!["block99_conv1".into()], ..q };
    let err = format!("{:#}", export_int8(&options(run, &out), &unknown).unwrap_err());
    assert!(err.contains("no layer `block99_conv1`"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    assert!(std::fs::read_dir(root).unwrap().all(|f| !f.unwrap().file_name().to_string_lossy().contains(".tmp-")));
}

#[test]
fn bad_inputs_give_errors_that_name_the_file_and_leave_the_old_file_alone() {
    let dir = tmp("bad");
    // A missing model directory.
    let err = export(&options(&dir.join("nope"), &dir.join("m.onnx"))).err().unwrap();
    assert!(format!("{err:#}").contains("nope"), "{err:#}");

    // A truncated weights file: the error names it, and an existing model.onnx survives.
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let src = weights("kitchenware");
    std::fs::copy(src.join("model.json"), run.join("model.json")).unwrap();
    let w = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(run.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    let out = dir.join("model.onnx");
    std::fs::write(&out, b"previous model").unwrap();
    let err = format!("{:#}", export(&options(&run, &out)).err().unwrap());
    assert!(err.contains("model.safetensors"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous model");
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")));

    // A truncated ONNX file: the runtime names it instead of crashing.
    let good = dir.join("good.onnx");
    let mut o = options(&src, &good);
    o.verify = false;
    export(&o).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let err = OnnxModel::load(&cut, &ort()).err().unwrap().to_string();
    assert!(err.contains("cut.onnx"), "{err}");
}
