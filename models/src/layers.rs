//! The Xception layer list, written once: Keras' `keras.applications.Xception` as 14 blocks.
//!
//! The forward pass walks [`blocks`]; the Keras importer walks [`weight_layers`] (the layers that
//! hold weights, in Keras' order, which is what names them in a `.keras` file); the ONNX exporter
//! walks the blocks again. Each weight layer says how its Keras variables map onto the tensors
//! of our safetensors files ([`WeightLayer::tensors`]).

pub use crate::ops::Padding;
use serde::{Deserialize, Serialize};

/// Batch-norm epsilon of every Xception batch-norm layer (Keras' Xception sets 1e-3).
pub const BN_EPSILON: f64 = 1e-3;
/// Channels of the base's output feature map.
pub const FEATURES: usize = 2048;
/// The smallest input Keras' Xception accepts.
pub const MIN_INPUT_SIZE: usize = 71;
/// Number of blocks (1: stem, 2-4: entry flow, 5-12: middle flow, 13-14: exit flow).
pub const NUM_BLOCKS: usize = 14;

/// Where a convolution's ReLU sits. Keras names the activation layer after the convolution it
/// belongs to (`block3_sepconv1_act` comes before `block3_sepconv1`, `block14_sepconv1_act`
/// after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relu {
    None,
    /// On the convolution's input.
    Before,
    /// On the output of its batch-norm.
    After,
}

/// A dense convolution (Keras `Conv2D`, no bias) followed by batch-norm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSpec {
    /// Our name (the prefix of its tensors; its batch-norm is `{name}_bn`).
    pub name: String,
    /// The names `keras.applications.Xception` gives the convolution and its batch-norm in a
    /// fresh Keras session (the shortcut convolutions are unnamed: `conv2d`, `conv2d_1`, ...).
    pub keras_name: String,
    pub keras_bn_name: String,
    pub kernel: usize,
    pub cin: usize,
    pub cout: usize,
    pub stride: usize,
    pub padding: Padding,
    pub relu: Relu,
}

/// A separable convolution (Keras `SeparableConv2D`: 3x3 depthwise, 'same', stride 1, then
/// pointwise; no bias) followed by batch-norm `{name}_bn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SepConvSpec {
    pub name: String,
    pub cin: usize,
    pub cout: usize,
    pub relu: Relu,
}

/// What a block adds to its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Residual {
    /// Its input, unchanged (the middle flow).
    Identity,
    /// Its input through a strided 1x1 convolution + batch-norm (the down-sampling blocks).
    Conv(ConvSpec),
}

/// One block of Xception: dense convolutions, then separable ones, then an optional 3x3/2
/// 'same' max-pool, plus an optional residual branch added at the end. Every layer walks this:
/// the Candle forward pass, the Keras importer and the ONNX graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// 1-based, as in the Keras layer names (`block{index}_...`).
    pub index: usize,
    pub convs: Vec<ConvSpec>,
    pub sepconvs: Vec<SepConvSpec>,
    /// A 3x3, stride-2 'same' max-pool after the separable convolutions (`block{index}_pool`).
    pub pool: bool,
    /// Added after everything else (`block{index}_add`).
    pub residual: Option<Residual>,
}

/// The 3x3 window and stride of the blocks' max-pooling.
pub const POOL: (usize, usize) = (3, 2);

impl Block {
    /// Side of the block's output for an input of side `size`.
    pub fn output_size(&self, size: usize) -> usize {
        let mut s = size;
        for c in &self.convs {
            s = c.padding.output_size(s, c.kernel, c.stride);
        }
        if self.pool {
            s = Padding::Same.output_size(s, POOL.0, POOL.1);
        }
        s
    }

    /// Channels of the block's output.
    pub fn channels_out(&self) -> usize {
        match (self.sepconvs.last(), self.convs.last()) {
            (Some(s), _) => s.cout,
            (None, Some(c)) => c.cout,
            (None, None) => unreachable!("every block has a convolution"),
        }
    }
}

/// The 14 blocks of Xception, in order: the stem (two dense convolutions), the entry flow
/// (blocks 2-4, down-sampling), the middle flow (blocks 5-12, 728 channels, identity residuals)
/// and the exit flow (block 13 down-sampling, block 14 widening to 2048 channels).
pub fn blocks() -> Vec<Block> {
    let sep = |block: usize, i: usize, cin: usize, cout: usize, relu: Relu| SepConvSpec {
        name: format!("block{block}_sepconv{i}"),
        cin,
        cout,
        relu,
    };
    let mut shortcuts = 0;
    // Keras' down-sampling block: (relu), sepconv, relu, sepconv, pool, + strided 1x1 conv.
    let mut down = |index: usize, cin: usize, f1: usize, f2: usize, relu_first: bool| {
        let k = if shortcuts == 0 { String::new() } else { format!("_{shortcuts}") };
        shortcuts += 1;
        Block {
            index,
            convs: vec![],
            sepconvs: vec![
                sep(index, 1, cin, f1, if relu_first { Relu::Before } else { Relu::None }),
                sep(index, 2, f1, f2, Relu::Before),
            ],
            pool: true,
            residual: Some(Residual::Conv(ConvSpec {
                name: format!("block{index}_shortcut"),
                keras_name: format!("conv2d{k}"),
                keras_bn_name: format!("batch_normalization{k}"),
                kernel: 1,
                cin,
                cout: f2,
                stride: 2,
                padding: Padding::Same,
                relu: Relu::None,
            })),
        }
    };
    let stem_conv = |i: usize, cin: usize, cout: usize, stride: usize| ConvSpec {
        name: format!("block1_conv{i}"),
        keras_name: format!("block1_conv{i}"),
        keras_bn_name: format!("block1_conv{i}_bn"),
        kernel: 3,
        cin,
        cout,
        stride,
        padding: Padding::Valid,
        relu: Relu::After,
    };
    let mut b = vec![
        Block {
            index: 1,
            convs: vec![stem_conv(1, 3, 32, 2), stem_conv(2, 32, 64, 1)],
            sepconvs: vec![],
            pool: false,
            residual: None,
        },
        down(2, 64, 128, 128, false),
        down(3, 128, 256, 256, true),
        down(4, 256, 728, 728, true),
    ];
    b.extend((5..=12).map(|index| Block {
        index,
        convs: vec![],
        sepconvs: (1..=3).map(|i| sep(index, i, 728, 728, Relu::Before)).collect(),
        pool: false,
        residual: Some(Residual::Identity),
    }));
    b.push(down(13, 728, 728, 1024, true));
    b.push(Block {
        index: 14,
        convs: vec![],
        sepconvs: vec![sep(14, 1, 1024, 1536, Relu::After), sep(14, 2, 1536, FEATURES, Relu::After)],
        pool: false,
        residual: None,
    });
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

/// The layers of the Xception base that hold weights, in Keras' layer order (per block: the
/// dense convolutions, the separable ones, then the residual convolution).
pub fn weight_layers() -> Vec<WeightLayer> {
    let mut out = Vec::new();
    let conv = |out: &mut Vec<WeightLayer>, c: &ConvSpec| {
        out.push(WeightLayer::conv(&c.name, &c.keras_name, c.kernel, c.cin, c.cout));
        out.push(WeightLayer::bn(&format!("{}_bn", c.name), &c.keras_bn_name, c.cout));
    };
    for block in blocks() {
        for c in &block.convs {
            conv(&mut out, c);
        }
        for s in &block.sepconvs {
            out.push(WeightLayer::sepconv(&s.name, s.cin, s.cout));
            let bn = format!("{}_bn", s.name);
            out.push(WeightLayer::bn(&bn, &bn, s.cout));
        }
        if let Some(Residual::Conv(c)) = &block.residual {
            conv(&mut out, c);
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
    blocks().iter().take(block).fold(size, |s, b| b.output_size(s))
}

#[cfg(test)]
mod tests {
    use super::*;

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
