//! End-to-end training on a small slice of the footwear photos (8 per class and split, 71 px),
//! with the real ImageNet weights: reproducibility, resume after SIGKILL, and the cached path
//! against the plain forward pass of the saved model.

use candle_core::{Device, ModuleT, Tensor};
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

fn base() -> PathBuf {
    testkit::weights("xception-imagenet")
}

fn small_config(data: &Path, out: &Path) -> TrainConfig {
    let mut c = TrainConfig {
        data: data.into(),
        base: base(),
        out: out.into(),
        image_size: 71,
        variants: 2,
        fine_tune_from: 14,
        feature_cache: out.parent().unwrap().join("feature-cache"),
        ..Default::default()
    };
    c.head.epochs = 4;
    c.head.patience = 0;
    // Enough phase-2 epochs for the kill below to land in the middle of phase 2.
    c.fine_tune.epochs = 40;
    c.fine_tune.patience = 0;
    // The moving average of the weights is part of the state a resumed run must restore.
    c.fine_tune.ema = 0.99;
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
    assert!(std::fs::read_dir(root.join("feature-cache")).unwrap().count() >= 9);
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
    cfg.head.epochs = 2;
    cfg.fine_tune.epochs = 1;
    trainer::train::run(&cfg, false, &Device::Cpu).unwrap();
    let (model, desc) = Classifier::load(&out, &Device::Cpu).unwrap();
    assert_eq!(desc.classes, ["boot", "sandal", "shoe"]);
    let ds = trainer::data::scan(&data).unwrap();
    let (imgs, _) = trainer::data::load(&ds.splits[2], 71, &desc.preprocessing, true, "test").unwrap();
    let spec = trainer::features::CacheSpec {
        variants: 1,
        augment: &cfg.augment,
        seed: 1,
        stream: 2,
        upto: 13,
        batch: 5,
        prep: &desc.preprocessing,
        dtype: candle_core::DType::F32,
    };
    // The cache is built with the frozen ImageNet base: blocks 1-13 are frozen in this run.
    let frozen = Classifier::load(&base(), &Device::Cpu).unwrap().0;
    let cache = trainer::features::build(&frozen.base, &imgs, &spec, "cache", &Device::Cpu).unwrap();
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
    assert!(d < 1e-4, "cached and direct logits differ by {d}");
    std::fs::remove_dir_all(out).unwrap();
    std::fs::remove_dir_all(data).unwrap();
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
    cfg.head.epochs = 6;
    cfg.fine_tune.epochs = 2;
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
    cfg.fine_tune.epochs = 0;
    trainer::train::run(&cfg, false, &Device::Cpu).unwrap();
    assert!(std::fs::read_dir(out.join("feature-cache")).unwrap().count() > caches);
    std::fs::remove_dir_all(out).unwrap();
    std::fs::remove_dir_all(data).unwrap();
}
