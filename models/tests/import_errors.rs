//! Keras import and weight loading on good and bad files: the classic `.h5` layout, truncated
//! and mismatched files. Every failure must be an error naming the file (and the tensor), never
//! a panic.

use candle_core::{Device, Tensor};
use hdf5_pure::{AttrValue, FileBuilder};
use models::keras_import::{import, ImportOptions};
use models::layers::{self, KerasClass, Transform};
use models::weights::{write_model_dir, ModelDir};
use models::Classifier;
use std::path::{Path, PathBuf};
use testkit::{max_abs_diff, repo, weights};

fn opts(base_only: bool) -> ImportOptions {
    ImportOptions {
        name: "t".into(),
        input_size: 150,
        classes: None,
        base_only,
        max_member_bytes: models::keras_import::MAX_MEMBER_BYTES,
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("models-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn keras_file() -> PathBuf {
    let dir = std::env::var_os("WEIGHTS_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("weights"));
    let p = dir.join("download/kitchenware.keras");
    assert!(p.exists(), "{} is missing: run scripts/fetch-weights.sh first", p.display());
    p
}

/// Writes the ImageNet base as a classic Keras 2 weights file (`layer_names`, `weight_names`,
/// `layer/layer/kernel:0`), optionally with one layer's kernel of the wrong shape.
fn write_legacy_h5(path: &Path, corrupt: Option<&str>) {
    let m = ModelDir::load(&weights("xception-imagenet"), &Device::Cpu).unwrap();
    let mut fb = FileBuilder::new();
    let mut names = Vec::new();
    for layer in layers::weight_layers() {
        let var_names: &[&str] = match layer.class {
            KerasClass::Conv2D => &["kernel"],
            KerasClass::SeparableConv2D => &["depthwise_kernel", "pointwise_kernel"],
            KerasClass::BatchNormalization => &["gamma", "beta", "moving_mean", "moving_variance"],
            KerasClass::Dense => &["kernel", "bias"],
        };
        let mut outer = fb.create_group(&layer.keras_name);
        let mut inner = outer.create_group(&layer.keras_name);
        for spec in layer.tensors() {
            let t = &m.tensors[&spec.name];
            let t = match spec.transform {
                Transform::Reshape => t.clone(),
                Transform::Transpose => t.t().unwrap().contiguous().unwrap(),
            };
            let mut shape: Vec<u64> = layer.keras_shapes[spec.keras_var].iter().map(|&d| d as u64).collect();
            let mut data = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if corrupt == Some(layer.name.as_str()) {
                data.truncate(data.len() / 2);
                shape = vec![data.len() as u64];
            }
            inner.create_dataset(&format!("{}:0", var_names[spec.keras_var])).with_f32_data(&data).with_shape(&shape);
        }
        outer.add_group(inner.finish());
        let weight_names = var_names.iter().map(|v| format!("{}/{v}:0", layer.keras_name)).collect();
        outer.set_attr("weight_names", AttrValue::AsciiStringArray(weight_names));
        fb.add_group(outer.finish());
        names.push(layer.keras_name.clone());
    }
    fb.set_attr("layer_names", AttrValue::AsciiStringArray(names));
    std::fs::write(path, fb.finish().unwrap()).unwrap();
}

#[test]
fn classic_h5_imports_to_the_same_tensors() {
    let dir = tmp("legacy");
    let h5 = dir.join("xception_notop.h5");
    write_legacy_h5(&h5, None);
    let imported = import(&h5, &opts(false)).unwrap();
    assert!(imported.description.head.is_none());
    let want = ModelDir::load(&weights("xception-imagenet"), &Device::Cpu).unwrap();
    assert_eq!(imported.tensors.len(), want.tensors.len());
    for (name, t) in &imported.tensors {
        assert_eq!(max_abs_diff(t, &want.tensors[name]), 0.0, "{name}");
    }
    let bad = dir.join("bad.h5");
    write_legacy_h5(&bad, Some("block7_sepconv2"));
    let e = import(&bad, &opts(false)).err().expect("a mismatched file must not import").to_string();
    assert!(e.contains("bad.h5") && e.contains("block7_sepconv2") && e.contains("shape"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_keras_file_is_an_error_naming_it() {
    let dir = tmp("trunc-keras");
    let bytes = std::fs::read(keras_file()).unwrap();
    for keep in [0, 100, bytes.len() / 2, bytes.len() - 1000] {
        let p = dir.join(format!("cut-{keep}.keras"));
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let e = import(&p, &opts(false)).err().expect("a truncated file must not import").to_string();
        assert!(e.contains(&format!("cut-{keep}.keras")), "{e}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_or_mismatched_weights_are_errors_naming_file_and_tensor() {
    let src = weights("kitchenware");
    let dir = tmp("trunc-st");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(src.join("model.json"), model.join("model.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(model.join("model.safetensors"), &bytes[..bytes.len() / 3]).unwrap();
    let e = Classifier::load(&model, &Device::Cpu).expect_err("truncated").to_string();
    assert!(e.contains("model.safetensors"), "{e}");

    // A description that promises 3 classes over weights with 6.
    let m = ModelDir::load(&src, &Device::Cpu).unwrap();
    let tensors: Vec<(String, Tensor)> = m.tensors.into_iter().collect();
    let mut desc = m.description.clone();
    desc.head.as_mut().unwrap().classes = 3;
    desc.classes.truncate(3);
    write_model_dir(&model, &desc, &tensors).unwrap();
    let e = Classifier::load(&model, &Device::Cpu).expect_err("mismatch").to_string();
    assert!(e.contains("model.safetensors") && e.contains("head_logits.weight") && e.contains("[6, 100]"), "{e}");

    // A missing directory, and a file that is not a model at all.
    let e = Classifier::load(&dir.join("nope"), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("nope"), "{e}");
    let junk = dir.join("junk.keras");
    std::fs::write(&junk, b"hello").unwrap();
    let e = import(&junk, &opts(false)).err().unwrap().to_string();
    assert!(e.contains("junk.keras"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn keras_import_keeps_or_drops_the_head() {
    let full = import(&keras_file(), &opts(false)).unwrap();
    let head = full.description.head.unwrap();
    assert_eq!((head.inner, head.classes, head.dropout), (100, 6, 0.2));
    let base = import(&keras_file(), &opts(true)).unwrap();
    assert!(base.description.head.is_none());
    assert_eq!(base.tensors.len(), layers::base_tensors().len());
}
