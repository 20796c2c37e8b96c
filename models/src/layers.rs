//! The Xception layer list, written once: Keras' `keras.applications.Xception` as 14 blocks.
//!
//! The forward pass walks [`blocks`]; the Keras importer walks [`weight_layers`] (the layers that
//! hold weights, in Keras' order, which is what names them in a `.keras` file); the ONNX exporter
//! walks the blocks again. Each weight layer says how its Keras variables map onto the tensors
//! of our safetensors files ([`WeightLayer::tensors`]).

use serde::{Deserialize, Serialize};

/// Batch-norm epsilon of every Xception batch-norm layer (Keras' Xception sets 1e-3).
pub const BN_EPSILON: f64 = 1e-3;
/// Channels of the base's output feature map.
pub const FEATURES: usize = 2048;
/// The smallest input Keras' Xception accepts.
pub const MIN_INPUT_SIZE: usize = 71;
/// Number of blocks (1: stem, 2-4: entry flow, 5-12: middle flow, 13-14: exit flow).
pub const NUM_BLOCKS: usize = 14;

/// One block of Xception.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// Block 1: two dense 3x3 convolutions (32 channels stride 2, 64 channels), 'valid' padding.
    Stem,
    /// Blocks 2, 3, 4, 13: (relu), sepconv(f1), relu, sepconv(f2), 3x3/2 max-pool, plus a strided
    /// 1x1 convolution shortcut.
    Down { index: usize, cin: usize, f1: usize, f2: usize, relu_first: bool },
    /// Blocks 5-12: three (relu, sepconv(728)) and an identity shortcut.
    Middle { index: usize },
    /// Block 14: sepconv(1536), relu, sepconv(2048), relu.
    Exit,
}

impl Block {
    /// The block's 1-based number, as in its Keras layer names.
    pub fn index(&self) -> usize {
        match self {
            Block::Stem => 1,
            Block::Down { index, .. } | Block::Middle { index } => *index,
            Block::Exit => 14,
        }
    }
}

/// The 14 blocks of Xception, in order.
pub fn blocks() -> Vec<Block> {
    let mut b = vec![
        Block::Stem,
        Block::Down { index: 2, cin: 64, f1: 128, f2: 128, relu_first: false },
        Block::Down { index: 3, cin: 128, f1: 256, f2: 256, relu_first: true },
        Block::Down { index: 4, cin: 256, f1: 728, f2: 728, relu_first: true },
    ];
    b.extend((5..=12).map(|index| Block::Middle { index }));
    b.push(Block::Down { index: 13, cin: 728, f1: 728, f2: 1024, relu_first: true });
    b.push(Block::Exit);
    b
}

/// Keras class of a layer that holds weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KerasClass {
    Conv2D,
    SeparableConv2D,
    BatchNormalization,
    Dense,
}

impl KerasClass {
    /// The Keras class name.
    pub fn name(self) -> &'static str {
        match self {
            KerasClass::Conv2D => "Conv2D",
            KerasClass::SeparableConv2D => "SeparableConv2D",
            KerasClass::BatchNormalization => "BatchNormalization",
            KerasClass::Dense => "Dense",
        }
    }

    /// The snake-case prefix Keras 3 gives this class's layers inside a `.keras` weights file.
    pub fn h5_prefix(self) -> &'static str {
        match self {
            KerasClass::Conv2D => "conv2d",
            KerasClass::SeparableConv2D => "separable_conv2d",
            KerasClass::BatchNormalization => "batch_normalization",
            KerasClass::Dense => "dense",
        }
    }
}

/// A layer with weights, as Keras defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightLayer {
    /// Our name: the Keras layer name, except for the shortcut convolutions that Keras leaves
    /// unnamed (`conv2d`, `batch_normalization`, ...), which we call `blockN_shortcut[_bn]`.
    pub name: String,
    /// The name `keras.applications.Xception` gives the layer in a fresh Keras session.
    pub keras_name: String,
    pub class: KerasClass,
    /// Shapes of the Keras variables, in Keras' order.
    pub keras_shapes: Vec<Vec<usize>>,
}

/// How one Keras variable becomes one of our tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Same data, new shape (dropping unit axes).
    Reshape,
    /// A 2-D matrix transposed (Keras Dense [in, out] → Candle Linear [out, in]).
    Transpose,
}

/// One tensor of our weight files and the Keras variable it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Index of the Keras variable of the layer.
    pub keras_var: usize,
    pub transform: Transform,
}

impl WeightLayer {
    fn new(name: &str, keras_name: &str, class: KerasClass, keras_shapes: Vec<Vec<usize>>) -> Self {
        Self { name: name.into(), keras_name: keras_name.into(), class, keras_shapes }
    }

    fn conv(name: &str, keras_name: &str, k: usize, cin: usize, cout: usize) -> Self {
        Self::new(name, keras_name, KerasClass::Conv2D, vec![vec![k, k, cin, cout]])
    }

    fn sepconv(name: &str, cin: usize, cout: usize) -> Self {
        Self::new(name, name, KerasClass::SeparableConv2D, vec![vec![3, 3, cin, 1], vec![1, 1, cin, cout]])
    }

    fn bn(name: &str, keras_name: &str, c: usize) -> Self {
        Self::new(name, keras_name, KerasClass::BatchNormalization, vec![vec![c]; 4])
    }

    /// A Dense layer `cin → cout` (with bias), for the classifier head.
    pub fn dense(name: &str, cin: usize, cout: usize) -> Self {
        Self::new(name, name, KerasClass::Dense, vec![vec![cin, cout], vec![cout]])
    }

    /// Our tensors for this layer: names, shapes, and where each comes from.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let t = |suffix: &str, shape: Vec<usize>, keras_var: usize, transform: Transform| TensorSpec {
            name: format!("{}.{suffix}", self.name),
            shape,
            keras_var,
            transform,
        };
        let s = &self.keras_shapes;
        match self.class {
            KerasClass::Conv2D => vec![t("kernel", s[0].clone(), 0, Transform::Reshape)],
            KerasClass::SeparableConv2D => vec![
                t("depthwise", s[0][..3].to_vec(), 0, Transform::Reshape),
                t("pointwise", s[1][2..].to_vec(), 1, Transform::Reshape),
            ],
            KerasClass::BatchNormalization => ["gamma", "beta", "moving_mean", "moving_variance"]
                .iter()
                .enumerate()
                .map(|(i, n)| t(n, s[i].clone(), i, Transform::Reshape))
                .collect(),
            KerasClass::Dense => vec![
                t("weight", vec![s[0][1], s[0][0]], 0, Transform::Transpose),
                t("bias", s[1].clone(), 1, Transform::Reshape),
            ],
        }
    }
}

/// Names used for the sub-layers of a block (shared by the forward pass and the exporter).
pub fn sepconv_name(block: usize, i: usize) -> String {
    format!("block{block}_sepconv{i}")
}

/// Our name of block `block`'s shortcut convolution.
pub fn shortcut_name(block: usize) -> String {
    format!("block{block}_shortcut")
}

/// The layers of the Xception base that hold weights, in Keras' layer order.
pub fn weight_layers() -> Vec<WeightLayer> {
    let mut out = Vec::new();
    let mut shortcuts = 0;
    let suffix = |i: usize| if i == 0 { String::new() } else { format!("_{i}") };
    for block in blocks() {
        match block {
            Block::Stem => {
                out.push(WeightLayer::conv("block1_conv1", "block1_conv1", 3, 3, 32));
                out.push(WeightLayer::bn("block1_conv1_bn", "block1_conv1_bn", 32));
                out.push(WeightLayer::conv("block1_conv2", "block1_conv2", 3, 32, 64));
                out.push(WeightLayer::bn("block1_conv2_bn", "block1_conv2_bn", 64));
            }
            Block::Down { index, cin, f1, f2, .. } => {
                for (i, (a, b)) in [(cin, f1), (f1, f2)].into_iter().enumerate() {
                    let n = sepconv_name(index, i + 1);
                    out.push(WeightLayer::sepconv(&n, a, b));
                    out.push(WeightLayer::bn(&format!("{n}_bn"), &format!("{n}_bn"), b));
                }
                let (n, k) = (shortcut_name(index), suffix(shortcuts));
                out.push(WeightLayer::conv(&n, &format!("conv2d{k}"), 1, cin, f2));
                out.push(WeightLayer::bn(&format!("{n}_bn"), &format!("batch_normalization{k}"), f2));
                shortcuts += 1;
            }
            Block::Middle { index } => {
                for i in 1..=3 {
                    let n = sepconv_name(index, i);
                    out.push(WeightLayer::sepconv(&n, 728, 728));
                    out.push(WeightLayer::bn(&format!("{n}_bn"), &format!("{n}_bn"), 728));
                }
            }
            Block::Exit => {
                for (i, (a, b)) in [(1024, 1536), (1536, 2048)].into_iter().enumerate() {
                    let n = sepconv_name(14, i + 1);
                    out.push(WeightLayer::sepconv(&n, a, b));
                    out.push(WeightLayer::bn(&format!("{n}_bn"), &format!("{n}_bn"), b));
                }
            }
        }
    }
    out
}

/// All tensors of the Xception base, in order.
pub fn base_tensors() -> Vec<TensorSpec> {
    weight_layers().iter().flat_map(|l| l.tensors()).collect()
}

/// Spatial size of the base's output feature map for a square input of `size` pixels.
pub fn output_size(size: usize) -> usize {
    output_size_after(size, NUM_BLOCKS)
}

/// Spatial size of the output of block `block` (1-based) for a square input of `size` pixels.
pub fn output_size_after(size: usize, block: usize) -> usize {
    // Stem: two 'valid' 3x3 convolutions, the first of stride 2; blocks 2, 3, 4 and 13 pool with
    // stride 2 and 'same' padding.
    let mut s = (size - 3) / 2 + 1 - 2;
    for b in blocks().iter().take(block).skip(1) {
        if matches!(b, Block::Down { .. }) {
            s = s.div_ceil(2);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct KerasLayer {
        name: String,
        class: String,
        weights: Vec<Vec<usize>>,
    }

    /// The weight layers agree with `keras_layers.json`, written by TensorFlow/Keras from
    /// `keras.applications.Xception(include_top=False)` (../shared/fixtures/xception).
    #[test]
    fn weight_layers_match_keras() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures/xception/keras_layers.json");
        let text = std::fs::read_to_string(path).expect("read keras_layers.json");
        let keras: Vec<KerasLayer> = serde_json::from_str(&text).unwrap();
        let keras: Vec<_> = keras.into_iter().filter(|l| !l.weights.is_empty()).collect();
        let ours = weight_layers();
        assert_eq!(ours.len(), keras.len());
        for (o, k) in ours.iter().zip(&keras) {
            assert_eq!((o.keras_name.as_str(), o.class.name()), (k.name.as_str(), k.class.as_str()));
            assert_eq!(o.keras_shapes, k.weights, "{}", o.name);
        }
        let params: usize = ours.iter().flat_map(|l| &l.keras_shapes).map(|s| s.iter().product::<usize>()).sum();
        assert_eq!(params, 20_861_480);
    }

    #[test]
    fn output_sizes() {
        assert_eq!(output_size(299), 10);
        assert_eq!(output_size(150), 5);
        assert_eq!(output_size(71), 3);
        assert_eq!(output_size_after(150, 1), 72);
        assert_eq!(output_size_after(150, 12), 9);
        assert_eq!(output_size_after(299, 12), 19);
    }
}
