//! Speed of the Xception base and of its kernels, as images per second, plus peak memory.
//!
//!   cargo bench -p models --bench xception [-- FILTER]
//!
//! Needs the converted ImageNet weights (scripts/fetch-weights.sh); the figures and the
//! TensorFlow reference measured in the same sitting go to docs/benchmarks.md.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use models::ops::{depthwise::depthwise_conv2d, maxpool::max_pool2d, Padding};
use models::weights::{expected_tensors, ModelDir};
use models::xception::{global_avg_pool, Xception, XceptionOptions};
use models::{head::ClassifierHead, Classifier};
use modelspec::Head;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: models::alloc::Allocator = models::alloc::Allocator;

/// Median seconds per call of `f` over enough runs to fill `budget` (at least 3), after a warm-up.
fn median_secs(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < budget && times.len() < 50) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

fn report(what: &str, batch: usize, secs: f64) {
    println!("{what:<52} {:>8.1} ms/batch {:>8.1} img/s", secs * 1e3, batch as f64 / secs);
}

fn rand(shape: &[usize]) -> Tensor {
    Tensor::rand(-1f32, 1f32, shape, &Device::Cpu).unwrap()
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-')).unwrap_or_default();
    let want = |name: &str| name.contains(&filter);
    models::alloc::keep_freed_memory();
    let dev = Device::Cpu;
    let budget = Duration::from_secs(8);
    println!("threads: {}", candle_core::utils::get_num_threads());

    if want("kernels") {
        let x = rand(&[32, 72, 72, 128]);
        let k = rand(&[3, 3, 128]);
        let s = median_secs(budget, || {
            depthwise_conv2d(&x, &k, Padding::Same).unwrap();
        });
        report("kernels: depthwise 3x3, 32x72x72x128 (ours, NHWC)", 32, s);
        let xc = x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
        let kc = k.permute((2, 0, 1)).unwrap().unsqueeze(1).unwrap().contiguous().unwrap();
        let s = median_secs(budget, || {
            xc.conv2d(&kc, 1, 1, 1, 128).unwrap();
        });
        report("kernels: depthwise 3x3, 32x128x72x72 (Candle conv2d)", 32, s);
        let s = median_secs(budget, || {
            max_pool2d(&x, 3, 2, Padding::Same).unwrap();
        });
        report("kernels: max-pool 3x3/2 same, 32x72x72x128", 32, s);
    }

    let base_dir =
        std::env::var("WEIGHTS_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../weights").into());
    let dir = std::path::Path::new(&base_dir).join("xception-imagenet");
    let (model, _) = Classifier::load(&dir, &dev).expect("weights: run scripts/fetch-weights.sh");
    for (size, batch) in [(150, 1), (150, 32), (224, 32), (299, 1), (299, 32)] {
        let name = format!("forward: base + GAP, {size} px, batch {batch}");
        if !want(&name) {
            continue;
        }
        let x = rand(&[batch, size, size, 3]);
        let s = median_secs(budget, || {
            model.features(&x).unwrap();
        });
        report(&name, batch, s);
    }

    // The trainer's phase 2: cached output of the block before `from` in, the blocks from there
    // on and the head trainable.
    for (from, size, side) in [(13, 150, 9), (12, 224, 14), (13, 224, 14), (12, 256, 16), (13, 299, 19)] {
        let name = format!("train step: blocks {from}-14 + head, AdamW, {size} px, batch 32");
        if !want(&name) {
            continue;
        }
        let m = ModelDir::load(&dir, &dev).unwrap();
        let varmap = VarMap::new();
        let head_cfg = Head { inner: 100, dropout: 0.2, classes: 3 };
        let mut vars = Vec::new();
        let trainable: Vec<String> = (from..=14).map(|b| format!("block{b}_")).collect();
        {
            let mut data = varmap.data().lock().unwrap();
            for (k, t) in &m.tensors {
                let v = Var::from_tensor(t).unwrap();
                if trainable.iter().any(|p| k.starts_with(p.as_str())) {
                    vars.push(v.clone());
                }
                data.insert(k.clone(), v);
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let base =
            Xception::new(vb.clone(), XceptionOptions { trainable_from: Some(from), ..Default::default() }).unwrap();
        let head = ClassifierHead::new(&head_cfg, 2048, vb.clone()).unwrap();
        for (k, v) in varmap.data().lock().unwrap().iter() {
            if k.starts_with("head_") {
                vars.push(v.clone());
            }
        }
        assert!(expected_tensors(&m.description).len() <= varmap.all_vars().len());
        let mut opt = AdamW::new(vars, ParamsAdamW { lr: 1e-5, ..Default::default() }).unwrap();
        let x = rand(&[32, side, side, 728]);
        let y = Tensor::from_vec((0..32u32).map(|i| i % 3).collect::<Vec<_>>(), 32, &dev).unwrap();
        let s = median_secs(budget, || {
            let f = global_avg_pool(&base.forward_blocks(&x, from, 14, &mut |_, _| {}).unwrap()).unwrap();
            let logits = candle_core::ModuleT::forward_t(&head, &f, true).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            opt.backward_step(&loss).unwrap();
        });
        report(&name, 32, s);
    }
    println!("peak RSS: {:.0} MiB", peak_rss_mib());
}
