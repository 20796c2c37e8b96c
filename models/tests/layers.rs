//! The block description against Keras' own layer list, `keras_layers.json`, written by
//! TensorFlow/Keras from `keras.applications.Xception(include_top=False)`
//! (../shared/fixtures/xception): the layers that hold weights (names, classes, shapes) and
//! where every ReLU and pool sits.

use models::layers::{blocks, weight_layers, Relu};
use serde::Deserialize;

#[derive(Deserialize)]
struct KerasLayer {
    name: String,
    class: String,
    weights: Vec<Vec<usize>>,
}

fn keras_layers() -> Vec<KerasLayer> {
    let path = testkit::fixtures().join("xception/keras_layers.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn weight_layers_match_keras() {
    let keras: Vec<_> = keras_layers().into_iter().filter(|l| !l.weights.is_empty()).collect();
    let ours = weight_layers();
    assert_eq!(ours.len(), keras.len());
    for (o, k) in ours.iter().zip(&keras) {
        assert_eq!((o.keras_name.as_str(), o.class.name()), (k.name.as_str(), k.class.as_str()));
        assert_eq!(o.keras_shapes, k.weights, "{}", o.name);
    }
    let params: usize = ours.iter().flat_map(|l| &l.keras_shapes).map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(params, 20_861_480);
}

/// The main path of every block, in Keras' layer order: each convolution with its activation
/// before or after it, then the pool. Keras names the activations `{conv}_act`, so the order
/// says where each ReLU of the description must sit.
#[test]
fn relus_and_pools_sit_where_keras_puts_them() {
    let keras: Vec<String> = keras_layers()
        .into_iter()
        .filter(|l| {
            matches!(l.class.as_str(), "Activation" | "SeparableConv2D" | "MaxPooling2D")
                || (l.class == "Conv2D" && l.name.starts_with("block"))
        })
        .map(|l| l.name)
        .collect();
    let mut ours = Vec::new();
    for b in blocks() {
        let convs = b.convs.iter().map(|c| (&c.name, c.relu));
        for (name, relu) in convs.chain(b.sepconvs.iter().map(|s| (&s.name, s.relu))) {
            if relu == Relu::Before {
                ours.push(format!("{name}_act"));
            }
            ours.push(name.clone());
            if relu == Relu::After {
                ours.push(format!("{name}_act"));
            }
        }
        if b.pool {
            ours.push(format!("block{}_pool", b.index));
        }
    }
    assert_eq!(ours, keras);
}
