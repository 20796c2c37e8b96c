//! End-to-end training on a small slice of the footwear photos (8 per class and split, 71 px),
//! with the real ImageNet weights: reproducibility, resume after SIGKILL, and the cached path
//! against the plain forward pass of the saved model.

use candle_core::{Device, ModuleT, Tensor};
use models::weights::ModelDir;
use models::Classifier;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use trainer::config::TrainConfig;

fn tmp(name: &str) -> PathBuf {
    testkit::tmp("trainer-e2e", name)
}

/// A small image folder: symlinks to the first `per_class` photos of each class and split.
fn small_footwear(per_class: usize, name: &str) -> PathBuf {
    let dst = tmp(name);
    testkit::link_subset(&testkit::footwear(), &dst, per_class).unwrap();
    dst
}

/// A configuration reading `data` (what [`trainer::train::dataset`] needs).
fn cfg_for(data: &Path) -> TrainConfig {
    TrainConfig { data: data.into(), ..Default::default() }
}

fn base() -> PathBuf {
    testkit::weights("xception-imagenet")
}

fn ort_lib() -> PathBuf {
    inference::ortlib::installed(&testkit::repo())
}

fn small_config(data: &Path, out: &Path) -> TrainConfig {
    let mut c = TrainConfig {
        data: data.into(),
        base: base(),
        out: out.into(),
        image_size: 71.into(),
        variants: 2.into(),
        fine_tune_from: 14,
        feature_cache: out.parent().unwrap().join("feature-cache"),
        cache_engine: trainer::config::CacheEngine::Onnxruntime,
        ort_lib: Some(ort_lib()),
        ..Default::default()
    };
    c.head.epochs = 4.into();
    c.head.patience = 0.into();
    // Enough phase-2 epochs for the kill below to land in the middle of phase 2.
    c.fine_tune.epochs = 40.into();
    c.fine_tune.patience = 0.into();
    // The moving average of the weights is part of the state a resumed run must restore.
    c.fine_tune.ema = 0.99.into();
    // So are mixup's draws (pooled features in phase 1, block maps in phase 2).
    c.head.mixup = 0.2;
    c.fine_tune.mixup = 0.2;
    c.label_smoothing = 0.1;
    c.batch_size = 8;
    c
}

fn results(out: &Path) -> (serde_json::Value, Vec<u8>) {
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("seconds");
    (m, std::fs::read(out.join("model.safetensors")).unwrap())
}

#[test]
fn same_seed_same_result_and_resume_after_sigkill() {
    let data = small_footwear(8, "data-resume");
    let root = tmp("runs");
    let (a, b, k) = (root.join("a"), root.join("b"), root.join("killed"));
    trainer::train::run(&small_config(&data, &a), false, &Device::Cpu).unwrap();
    trainer::train::run(&small_config(&data, &b), false, &Device::Cpu).unwrap();
    // Run b read its features from the disk cache that run a wrote.
    // (Per split: pooled features, their header, the block maps, their header.)
    let cache_files = || std::fs::read_dir(root.join("feature-cache")).unwrap().count();
    assert_eq!(cache_files(), 12);
    let (ra, rb) = (results(&a), results(&b));
    assert_eq!(ra.0, rb.0, "same seed, different metrics");
    assert!(ra.1 == rb.1, "same seed, different weights");
    let acc = ra.0["test"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "24 test images, 3 classes: accuracy {acc} is no better than chance");

    // The same run through the binary, killed with SIGKILL once phase 2 has checkpointed.
    let cfg = small_config(&data, &k);
    let cfg_file = root.join("small.toml");
    std::fs::write(&cfg_file, cfg.to_toml()).unwrap();
    let bin = env!("CARGO_BIN_EXE_trainer");
    let mut child = Command::new(bin).args(["train", "--config"]).arg(&cfg_file).spawn().unwrap();
    let ckpt = k.join("checkpoint.safetensors");
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(300), "no phase-2 checkpoint after 300 s");
        if let Ok(c) = trainer::checkpoint::Checkpoint::load(&ckpt, &Device::Cpu) {
            if c.state.phase == trainer::checkpoint::Phase::FineTune && c.state.next_epoch >= 1 {
                break;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "training finished before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!k.join("metrics.json").exists());
    let status = Command::new(bin).args(["train", "--resume", "--config"]).arg(&cfg_file).status().unwrap();
    assert!(status.success());
    let rk = results(&k);
    assert_eq!(rk.0, ra.0, "resumed run ends with other metrics");
    assert!(rk.1 == ra.1, "resumed run ends with other weights");

    // Phase 2 off: the pooled features of the runs above are reused, nothing is recomputed.
    let mut head_only = small_config(&data, &root.join("head-only"));
    head_only.fine_tune.epochs = 0.into();
    trainer::train::run(&head_only, false, &Device::Cpu).unwrap();
    assert_eq!(cache_files(), 12, "phase 2 off recomputed features");
    std::fs::remove_dir_all(root).unwrap();
    std::fs::remove_dir_all(data).unwrap();
}

/// The cached path (feature cache → trained top blocks → head) gives the logits of the saved
/// model run from raw pixels.
#[test]
fn cached_path_equals_direct_forward() {
    let data = small_footwear(4, "data-cached");
    let out = tmp("cached");
    let mut cfg = small_config(&data, &out);
    cfg.head.epochs = 2.into();
    cfg.fine_tune.epochs = 1.into();
    trainer::train::run(&cfg, false, &Device::Cpu).unwrap();
    let (model, desc) = Classifier::load(&out, &Device::Cpu).unwrap();
    assert_eq!(desc.classes, ["boot", "sandal", "shoe"]);
    let ds = trainer::train::dataset(&cfg_for(&data)).unwrap();
    let (imgs, _) = trainer::data::load(&ds.splits[2], 71, &desc.preprocessing, true, "test").unwrap();
    let spec = trainer::features::CacheSpec {
        variants: 1,
        augment: &cfg.augment,
        seed: 1,
        stream: 2,
        upto: 13,
        maps: true,
        batch: 5,
        prep: &desc.preprocessing,
        dtype: candle_core::DType::F32,
    };
    // The cache is built with the frozen ImageNet base: blocks 1-13 are frozen in this run.
    let frozen = Classifier::load(&base(), &Device::Cpu).unwrap().0;
    let mut engine = trainer::features::Engine::Candle(&frozen.base);
    let cache = trainer::features::build(&mut engine, &imgs, &spec, None, "cache", &Device::Cpu).unwrap();
    let items: Vec<usize> = (0..cache.n).collect();
    let maps = cache.maps_batch(&items, &Device::Cpu).unwrap();
    let top = model.base.forward_blocks(&maps, 14, 14, &mut |_, _| {}).unwrap();
    let cached =
        model.head.as_ref().unwrap().forward_masked(&models::xception::global_avg_pool(&top).unwrap(), None).unwrap();
    let pixels: Vec<f32> = (0..imgs.len()).flat_map(|i| trainer::features::item_input(&imgs, i, 0, &spec)).collect();
    let x = Tensor::from_vec(pixels, (imgs.len(), 71, 71, 3), &Device::Cpu).unwrap();
    let direct = model.forward_t(&x, false).unwrap();
    let d =
        (cached - direct).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    // The maps are stored as float16: 2^-11 relative per value.
    assert!(d < 2e-3, "cached and direct logits differ by {d}");

    // `trainer eval` on the test split: the trainer's own test figures, on either engine; and
    // on the files a pattern picks.
    let reported: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    let (sandals, nothing) = (regex::Regex::new("^sandal_").unwrap(), regex::Regex::new("^nothing").unwrap());
    let (mut flipped, mut resized) = (Vec::new(), Vec::new());
    for engine in [trainer::config::CacheEngine::Onnxruntime, trainer::config::CacheEngine::Candle] {
        let o = trainer::eval::EvalOptions {
            run_dir: out.clone(),
            with: vec![],
            folders: vec![data.join("test")],
            split: None,
            only: None,
            engine,
            ort_lib: Some(ort_lib()),
            batch: 5,
            flip: false,
            image_size: None,
        };
        let r = &trainer::eval::evaluate(&o).unwrap()[0];
        assert_eq!(r.report.count, 12);
        // At another test-time resolution (the network is convolutional up to its pooling).
        let big =
            &trainer::eval::evaluate(&trainer::eval::EvalOptions { image_size: Some(96), ..o.clone() }).unwrap()[0];
        assert_eq!((big.report.count, big.image_size, r.image_size), (12, 96, 71));
        resized.push(big.report.confusion.clone());
        let e = trainer::eval::evaluate(&trainer::eval::EvalOptions { image_size: Some(40), ..o.clone() }).unwrap_err();
        assert!(e.to_string().contains("--image-size 40: out of range"), "{e:#}");
        // Flip averaging: every photo and its mirror; both engines agree on the outcome.
        let f = &trainer::eval::evaluate(&trainer::eval::EvalOptions { flip: true, ..o.clone() }).unwrap()[0];
        assert!(f.flip && f.report.count == 12);
        flipped.push(f.report.confusion.clone());
        assert_eq!(r.report.accuracy, reported["test"]["accuracy"].as_f64().unwrap(), "{engine:?}");
        assert_eq!(
            r.report.confusion,
            serde_json::from_value::<Vec<Vec<usize>>>(reported["test"]["confusion"].clone()).unwrap()
        );
        assert_eq!(r.errors.len(), 12 - r.report.confusion.iter().enumerate().map(|(i, row)| row[i]).sum::<usize>());
        let only = trainer::eval::EvalOptions { only: Some(sandals.clone()), ..o };
        let r = &trainer::eval::evaluate(&only).unwrap()[0];
        assert_eq!((r.files, r.report.count), (4, 4));
        assert_eq!(r.report.per_class.iter().map(|c| c.support).collect::<Vec<_>>(), [0, 4, 0]);
        let none = trainer::eval::EvalOptions { only: Some(nothing.clone()), ..only };
        let e = trainer::eval::evaluate(&none).unwrap_err().to_string();
        assert!(e.contains("no images whose name matches `^nothing`"), "{e}");
    }
    assert_eq!(flipped[0], flipped[1], "flip-averaged predictions of ONNX Runtime and Candle");
    assert_eq!(resized[0], resized[1], "96 px predictions of ONNX Runtime and Candle");

    // A second member of the same seed: the same caches and phase 1, another phase 2.
    let cache_files = || std::fs::read_dir(&cfg.feature_cache).unwrap().count();
    let files = cache_files();
    let m1 = tmp("cached-member-1");
    trainer::train::run(&TrainConfig { member: 1, out: m1.clone(), ..cfg.clone() }, false, &Device::Cpu).unwrap();
    assert_eq!(cache_files(), files, "a member recomputed the feature caches");
    let (d0, d1) = (ModelDir::load(&out, &Device::Cpu).unwrap(), ModelDir::load(&m1, &Device::Cpu).unwrap());
    let t = |d: &ModelDir, k: &str| d.tensors[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let top = "block14_sepconv2.pointwise";
    assert_ne!(t(&d0, top), t(&d1, top), "member 1 trained as member 0 did");
    // Blocks 1-13 are frozen: the members share them.
    assert_eq!(t(&d0, "block13_sepconv2.pointwise"), t(&d1, "block13_sepconv2.pointwise"));

    // Their soup: the mean of the weights, a run directory the evaluation reads.
    let soup = tmp("cached-soup");
    trainer::soup::soup(&[out.clone(), m1.clone()], &soup).unwrap();
    let ds = ModelDir::load(&soup, &Device::Cpu).unwrap();
    for ((a, b), m) in t(&d0, top).iter().zip(t(&d1, top)).zip(t(&ds, top)) {
        assert!((m - (a + b) / 2.0).abs() <= 1e-6 * (1.0 + m.abs()), "soup {m} of {a} and {b}");
    }
    let e = trainer::soup::soup(&[out.clone(), base()], &tmp("no-soup")).unwrap_err();
    assert!(format!("{e:#}").contains("another architecture, input size, head or classes"), "{e:#}");

    // An ensemble: a run with itself predicts as the run alone; with member 1, every photo is
    // still counted, and a model of other classes is refused.
    let o = trainer::eval::EvalOptions {
        run_dir: out.clone(),
        with: vec![],
        folders: vec![data.join("test")],
        split: None,
        only: None,
        engine: trainer::config::CacheEngine::Onnxruntime,
        ort_lib: Some(ort_lib()),
        batch: 5,
        flip: false,
        image_size: None,
    };
    let alone = &trainer::eval::evaluate(&o).unwrap()[0];
    let twice =
        &trainer::eval::evaluate(&trainer::eval::EvalOptions { with: vec![out.clone()], ..o.clone() }).unwrap()[0];
    assert_eq!((twice.runs.len(), &twice.report.confusion), (2, &alone.report.confusion));
    let both =
        &trainer::eval::evaluate(&trainer::eval::EvalOptions { with: vec![m1.clone()], ..o.clone() }).unwrap()[0];
    assert_eq!(both.report.count, 12);
    // A member sure of the class the run predicts least (its logit bias raised by 50) carries
    // the ensemble's mean to that class on every photo: the second member is counted.
    let predicted = |c: usize| alone.report.confusion.iter().map(|row| row[c]).sum::<usize>();
    let rare = (0..3).min_by_key(|&c| predicted(c)).unwrap();
    assert!(predicted(rare) < 12);
    let sure = tmp("cached-sure");
    let mut tensors: Vec<(String, Tensor)> = d0.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let bias = tensors.iter_mut().find(|(k, _)| k == "head_logits.bias").unwrap();
    let mut b = bias.1.to_vec1::<f32>().unwrap();
    b[rare] += 50.0;
    bias.1 = Tensor::new(b, &Device::Cpu).unwrap();
    models::weights::write_model_dir(&sure, &d0.description, &tensors).unwrap();
    let pulled =
        &trainer::eval::evaluate(&trainer::eval::EvalOptions { with: vec![sure.clone()], ..o.clone() }).unwrap()[0];
    assert_eq!(pulled.report.confusion.iter().map(|row| row[rare]).sum::<usize>(), 12, "{:?}", pulled.report.confusion);
    let e = trainer::eval::evaluate(&trainer::eval::EvalOptions { with: vec![base()], ..o }).unwrap_err();
    assert!(format!("{e:#}").contains("without a classifier head"), "{e:#}");
    for d in [out, m1, soup, sure, data] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// bf16 mixed precision (`--precision bf16`, meant for `--device cuda`; here on the CPU through
/// the same Candle-ops path) trains both phases: the loss falls, the weights stay f32, the test
/// accuracy beats chance, and its feature caches do not mix with the f32 ones.
#[test]
fn bf16_mixed_precision_trains() {
    let data = small_footwear(8, "data-bf16");
    let out = tmp("bf16");
    let mut cfg = small_config(&data, &out.join("run"));
    cfg.precision = trainer::config::ComputePrecision::Bf16;
    // bf16 caches come from the Candle network itself (ONNX Runtime computes f32).
    cfg.cache_engine = trainer::config::CacheEngine::Candle;
    cfg.head.epochs = 6.into();
    cfg.fine_tune.epochs = 2.into();
    trainer::train::run(&cfg, false, &Device::Cpu).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("run/metrics.json")).unwrap()).unwrap();
    let acc = m["test"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "24 test images, 3 classes: accuracy {acc} is no better than chance");
    let history = std::fs::read_to_string(out.join("run/history.csv")).unwrap();
    let losses: Vec<f64> = history.lines().skip(1).map(|l| l.split(',').nth(3).unwrap().parse().unwrap()).collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[losses.len() - 1] < losses[0], "training loss did not fall: {losses:?}");
    let saved = candle_core::safetensors::load(out.join("run/model.safetensors"), &Device::Cpu).unwrap();
    assert!(saved.values().all(|t| t.dtype() == candle_core::DType::F32));
    // One cache per split, keyed apart from f32 caches of the same images.
    let caches = std::fs::read_dir(out.join("feature-cache")).unwrap().count();
    cfg.precision = trainer::config::ComputePrecision::F32;
    cfg.out = out.join("run-f32");
    cfg.fine_tune.epochs = 0.into();
    trainer::train::run(&cfg, false, &Device::Cpu).unwrap();
    assert!(std::fs::read_dir(out.join("feature-cache")).unwrap().count() > caches);
    std::fs::remove_dir_all(out).unwrap();
    std::fs::remove_dir_all(data).unwrap();
}

/// The feature caches of the ONNX Runtime engine agree with Candle's, and a cache streamed to
/// disk reads back what was computed; pooled features load without the maps.
#[test]
fn onnxruntime_cache_matches_candle_and_streams_from_disk() {
    let data = small_footwear(4, "data-engines");
    let root = tmp("engines");
    let ds = trainer::train::dataset(&cfg_for(&data)).unwrap();
    let prep = modelspec::Preprocessing::default();
    let (imgs, _) = trainer::data::load(&ds.splits[0], 96, &prep, true, "train").unwrap();
    let aug = trainer::augment::AugmentConfig::default();
    let spec = trainer::features::CacheSpec {
        variants: 2,
        augment: &aug,
        seed: 3,
        stream: 0,
        upto: 11,
        maps: true,
        batch: 5,
        prep: &prep,
        dtype: candle_core::DType::F32,
    };
    let dev = Device::Cpu;
    let base_dir = models::weights::ModelDir::load(&base(), &dev).unwrap();
    let frozen = models::xception::Xception::new(base_dir.var_builder(&dev), Default::default()).unwrap();
    let weights: onnxgraph::Weights = base_dir
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), (t.dims().to_vec(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap())))
        .collect();
    let bytes = prost::Message::encode_to_vec(&onnxgraph::build_frozen(&weights, 96, 11).unwrap());
    let session =
        inference::session::FloatSession::from_bytes(&bytes, Path::new("frozen"), 2, Some(&ort_lib())).unwrap();
    let mut ort = trainer::features::Engine::OnnxRuntime { session: Box::new(session), upto: 11, check: &frozen };
    let mut candle = trainer::features::Engine::Candle(&frozen);
    let keys = trainer::features::disk_keys(&imgs, &spec, &base().join("model.safetensors"), &ort.name());
    // The seed and the split's stream draw the augmented variants: they are in the key of a
    // cache that holds augmented variants, not in that of the originals alone (validation and
    // test caches are shared by every seed).
    let key = |variants, seed, stream, augment: &trainer::augment::AugmentConfig| {
        let s = trainer::features::CacheSpec { variants, seed, stream, augment, ..spec };
        trainer::features::disk_keys(&imgs, &s, &base().join("model.safetensors"), &ort.name())
    };
    let off = trainer::augment::AugmentConfig { enabled: false, ..aug.clone() };
    assert_eq!(key(2, 3, 0, &aug), keys);
    assert_ne!(key(2, 4, 0, &aug), keys);
    assert_ne!(key(2, 3, 1, &aug), keys);
    assert_ne!(key(1, 3, 0, &aug), keys);
    assert_eq!(key(1, 3, 0, &aug), key(1, 4, 1, &off));
    assert_eq!(key(2, 3, 0, &off), key(2, 4, 0, &off));
    let a = trainer::features::build(&mut ort, &imgs, &spec, Some((&root, &keys)), "ort", &dev).unwrap();
    let b = trainer::features::build(&mut candle, &imgs, &spec, None, "candle", &dev).unwrap();
    assert_eq!((a.items(), a.map_dims), (24, [6, 6, 728]));
    let items: Vec<usize> = (0..a.items()).collect();
    let (ma, mb) = (a.maps_batch(&items, &dev).unwrap(), b.maps_batch(&items, &dev).unwrap());
    let scale = mb.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let d = testkit::max_abs_diff(&ma, &mb);
    // Both stored as float16: the difference is a rounding step at most.
    assert!(d <= 1e-3 * scale, "maps differ by {d} (largest {scale})");
    let dp = a.pooled.iter().zip(&b.pooled).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(dp < 1e-4, "pooled features differ by {dp}");
    // Read back from disk: the same values, and the pooled features alone.
    let c = trainer::features::load(&root, &keys, true).expect("the cache on disk");
    assert_eq!(testkit::max_abs_diff(&c.maps_batch(&items, &dev).unwrap(), &ma), 0.0);
    assert_eq!((c.pooled.clone(), c.labels.clone()), (a.pooled.clone(), a.labels.clone()));
    let p = trainer::features::load(&root, &keys, false).expect("the pooled features");
    assert!(!p.has_maps() && p.pooled == a.pooled);
    // A truncated map file is not a cache.
    let maps_file = root.join(format!("{}.maps.f16", keys.1));
    let len = std::fs::metadata(&maps_file).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&maps_file).unwrap().set_len(len - 2).unwrap();
    assert!(trainer::features::load(&root, &keys, true).is_none());
    std::fs::remove_dir_all(root).unwrap();
    std::fs::remove_dir_all(data).unwrap();
}

/// A photo that does not decode: skipped with a warning by default (the run trains and counts
/// one test photo fewer), a clear error naming the file with `strict`. Phase 2 is off here, so
/// the feature-cache folder is created for pooled features alone (it once failed with a bare
/// "No such file or directory").
#[test]
fn unreadable_photo_is_skipped_or_named_with_strict() {
    let data = small_footwear(3, "data-corrupt");
    let bad = data.join("test/boot/zz_corrupt.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 not a whole jpeg").unwrap();
    let root = tmp("corrupt");
    let mut cfg = small_config(&data, &root.join("lenient"));
    cfg.fine_tune.epochs = 0.into();
    cfg.head.epochs = 2.into();
    if let Err(e) = trainer::train::run(&cfg, false, &Device::Cpu) {
        panic!("{e:#}");
    }
    let (m, _) = results(&cfg.out);
    assert_eq!(m["test"]["count"].as_u64(), Some(9), "10 test files, 1 unreadable: {}", m["test"]);
    assert_eq!(m["test"]["per_class"][0]["support"].as_u64(), Some(3), "{}", m["test"]);

    let mut strict = cfg.clone();
    strict.out = root.join("strict");
    strict.strict = true;
    let err = format!("{:#}", trainer::train::run(&strict, false, &Device::Cpu).unwrap_err());
    assert!(err.contains("zz_corrupt.jpg"), "the error does not name the file: {err}");
    assert!(!strict.out.join("metrics.json").exists());
    std::fs::remove_dir_all(root).unwrap();
    std::fs::remove_dir_all(data).unwrap();
}

/// `--refit`: the validation photos join training (all, or every other one per class with the
/// rest held out), and each phase runs all its epochs whatever validation says (a patience of 1
/// would stop it otherwise) and keeps the last weights; with `all`, the model's description does
/// not claim the in-sample validation accuracy as a score.
#[test]
fn refit_trains_on_validation_photos_for_all_epochs() {
    let data = small_footwear(4, "data-refit");
    let root = tmp("refit");
    let mut cfg = small_config(&data, &root.join("half"));
    cfg.fine_tune.epochs = 0.into();
    cfg.head.epochs = 6.into();
    cfg.head.patience = 1.into();
    cfg.head.mixup = 0.0;
    cfg.refit = trainer::config::Refit::Half;
    trainer::train::run(&cfg, false, &Device::Cpu).unwrap();
    let (m, _) = results(&cfg.out);
    assert_eq!(m["validation"]["count"].as_u64(), Some(6), "4 per class, 2 held out each: {}", m["validation"]);
    assert_eq!(m["epochs"].as_u64(), Some(6), "refit stopped early: {m}");
    assert_eq!(m["refit"], "half");
    let history: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cfg.out.join("history.json")).unwrap()).unwrap();
    let history = history.as_array().unwrap();
    assert_eq!(history.len(), 6);
    // The weights kept are the last epoch's: the final report is that epoch's validation.
    assert_eq!(m["validation"]["accuracy"].as_f64(), history[5]["val_acc"].as_f64(), "{m}");
    // Without refit the same settings stop early, so the checks above are not vacuous.
    let mut off = cfg.clone();
    off.out = root.join("off");
    off.refit = trainer::config::Refit::Off;
    trainer::train::run(&off, false, &Device::Cpu).unwrap();
    let (m_off, _) = results(&off.out);
    assert!(m_off["epochs"].as_u64().unwrap() < 6, "patience 1 did not stop the plain run: {m_off}");

    let mut all = cfg.clone();
    all.out = root.join("all");
    all.refit = trainer::config::Refit::All;
    trainer::train::run(&all, false, &Device::Cpu).unwrap();
    let (m, _) = results(&all.out);
    assert_eq!(m["validation"]["count"].as_u64(), Some(12), "{}", m["validation"]);
    assert_eq!(m["epochs"].as_u64(), Some(6));
    let description: serde_json::Value =
        serde_json::from_slice(&std::fs::read(all.out.join("model.json")).unwrap()).unwrap();
    assert!(description["metrics"]["validation_accuracy"].is_null(), "{}", description["metrics"]);
    assert!(description["metrics"]["test_accuracy"].as_f64().is_some());
    // The training set grew: its cache has 3 classes x (4 train + 4 validation) photos, 2 variants each.
    let caches: Vec<serde_json::Value> = std::fs::read_dir(root.join("feature-cache"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name()?.to_str()?.to_owned();
            (name.ends_with(".json") && !name.ends_with(".maps.json"))
                .then(|| serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap())
        })
        .collect();
    let sizes: Vec<(u64, u64)> =
        caches.iter().map(|h| (h["n"].as_u64().unwrap(), h["variants"].as_u64().unwrap())).collect();
    assert!(sizes.contains(&(24, 2)), "no cache of 24 training photos x 2 variants among {sizes:?}");
    std::fs::remove_dir_all(root).unwrap();
    std::fs::remove_dir_all(data).unwrap();
}

/// Links the photos of `src/<split>/<class>/` of `splits` into `dst/<class>/`: a folder of class
/// folders alone.
fn flatten(src: &Path, splits: &[&str], dst: &Path) {
    for split in splits {
        for class in std::fs::read_dir(src.join(split)).unwrap() {
            let class = class.unwrap().path();
            let to = dst.join(class.file_name().unwrap());
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(&class).unwrap() {
                let f = f.unwrap().path();
                std::os::unix::fs::symlink(std::fs::canonicalize(&f).unwrap(), to.join(f.file_name().unwrap()))
                    .unwrap();
            }
        }
    }
}

/// Class folders alone: validation and test are carved per class and seeded, written to
/// splits.csv, and the same seed gives the same splits, metrics and weights; `trainer eval
/// --split test` evaluates the carved test photos and gives the run's own test figures; the
/// report and its contact sheets are written.
#[test]
fn class_folders_alone_are_split_repeatably() {
    let src = small_footwear(4, "data-flat-src");
    let flat = tmp("data-flat");
    flatten(&src, &["train", "validation", "test"], &flat);
    let root = tmp("flat-runs");
    let run = |name: &str| {
        let mut cfg = small_config(&flat, &root.join(name));
        (cfg.fine_tune.epochs, cfg.head.epochs) = (0.into(), 3.into());
        cfg.validation_fraction = 0.25;
        cfg.test_fraction = 0.25;
        trainer::train::run(&cfg, false, &Device::Cpu).unwrap();
        cfg
    };
    let (a, b) = (run("a"), run("b"));
    let splits = |c: &TrainConfig| std::fs::read_to_string(c.out.join("splits.csv")).unwrap();
    assert_eq!(splits(&a), splits(&b), "same seed, other splits");
    let (ra, rb) = (results(&a.out), results(&b.out));
    assert_eq!(ra.0, rb.0, "same seed, different metrics");
    assert!(ra.1 == rb.1, "same seed, different weights");
    // 12 photos per class: 3 validation, 3 test, 6 train, every one carved.
    let rows = modelspec::splits::read(&a.out.join("splits.csv")).unwrap();
    let count = |s: modelspec::splits::Split| rows.iter().filter(|r| r.split == s).count();
    use modelspec::splits::Split;
    assert_eq!((count(Split::Train), count(Split::Validation), count(Split::Test)), (18, 9, 9));
    assert!(rows.iter().all(|r| r.origin == modelspec::splits::Origin::Carved));
    assert_eq!(ra.0["test"]["count"].as_u64(), Some(9));
    assert_eq!(ra.0["layout"], "class_folders");
    // Another seed carves other photos.
    let mut other = small_config(&flat, &root.join("seed7"));
    (other.fine_tune.epochs, other.head.epochs, other.seed) = (0.into(), 1.into(), 7);
    (other.validation_fraction, other.test_fraction) = (0.25, 0.25);
    trainer::train::run(&other, false, &Device::Cpu).unwrap();
    assert_ne!(splits(&other), splits(&a));
    // The run's own test photos, read back from splits.csv, give its test figures.
    let eval = trainer::eval::EvalOptions {
        run_dir: a.out.clone(),
        with: vec![],
        folders: vec![],
        split: Some(Split::Test),
        only: None,
        engine: trainer::config::CacheEngine::Candle,
        ort_lib: None,
        batch: 8,
        flip: false,
        image_size: None,
    };
    let r = &trainer::eval::evaluate(&eval).unwrap()[0];
    assert_eq!(r.report.count, 9);
    assert_eq!(
        r.report.confusion,
        serde_json::from_value::<Vec<Vec<usize>>>(ra.0["test"]["confusion"].clone()).unwrap()
    );
    assert_eq!(r.trained_on, 0);
    // Evaluating the flat folder itself: its training photos are counted as such.
    let all = trainer::eval::evaluate(&trainer::eval::EvalOptions { folders: vec![flat.clone()], split: None, ..eval })
        .unwrap();
    assert_eq!(all[0].trained_on, 18);
    // The report: the data, the settings, the figures, and the error sheets it drew.
    let html = std::fs::read_to_string(a.out.join("report.html")).unwrap();
    for want in ["class folders alone", "splits.csv", "Test (the final figure)", "Leaks between splits"] {
        assert!(html.contains(want), "report.html lacks {want:?}");
    }
    let wrong = ra.0["test"]["count"].as_u64().unwrap() as f64 * (1.0 - ra.0["test"]["accuracy"].as_f64().unwrap());
    assert_eq!(a.out.join("errors_test.png").exists(), wrong > 0.5, "errors sheet vs {wrong} test errors");
    for d in [root, flat, src] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// The PyTorch tutorial's layout (`train/` and `val/`, no `test/`): validation's figure is the
/// final one and says so; a validation photo that is a copy of a training photo (byte for byte,
/// or re-encoded at another size) is named as a leak.
#[test]
fn a_val_folder_without_test_and_leaks_between_splits() {
    let src = small_footwear(4, "data-val-src");
    let data = tmp("data-val");
    for (from, to) in [("train", "train"), ("validation", "val")] {
        for class in ["boot", "sandal", "shoe"] {
            std::fs::create_dir_all(data.join(to).join(class)).unwrap();
            for f in std::fs::read_dir(src.join(from).join(class)).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, data.join(to).join(class).join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    // Two leaks: a copy, and the same photo re-encoded at 90% of its size.
    let boots = src.join("train/boot");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&boots).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    std::fs::copy(&names[0], data.join("val/boot/copy-of-first.jpg")).unwrap();
    let img = image::open(&names[1]).unwrap();
    img.resize(img.width() * 9 / 10, img.height() * 9 / 10, image::imageops::FilterType::Triangle)
        .save(data.join("val/boot/resized-second.jpg"))
        .unwrap();
    let root = tmp("val-runs");
    let mut cfg = small_config(&data, &root.join("run"));
    (cfg.fine_tune.epochs, cfg.head.epochs) = (0.into(), 2.into());
    let o = trainer::train::run(&cfg, false, &Device::Cpu).unwrap();
    assert!(o.test.is_none() && !o.has_test_split);
    let (m, _) = results(&cfg.out);
    assert_eq!(m["final"], "validation (no test split)");
    assert_eq!(m["validation"]["count"].as_u64(), Some(14));
    assert_eq!(m["layout"]["splits"]["validation"], "val", "{}", m["layout"]);
    assert_eq!(m["leaks"].as_u64(), Some(2), "{m}");
    let html = std::fs::read_to_string(cfg.out.join("report.html")).unwrap();
    assert!(html.contains("copy-of-first.jpg") && html.contains("identical bytes"), "the copy is not named");
    assert!(html.contains("resized-second.jpg") && html.contains("similarity"), "the re-encoded copy is not named");
    assert!(html.contains("No test split"));
    for d in [root, data, src] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
