//! Xception (Chollet 2017) exactly as `keras.applications.Xception(include_top=False)`, on
//! channels-last data: input [N, H, W, 3] scaled to [-1, 1], output [N, h, w, 2048].
//!
//! Every convolution is followed by a batch-norm layer that runs in inference mode (Keras keeps
//! it so when fine-tuning, and so do we), so each conv + BN pair is one affine map, folded into
//! the convolution's weights once for frozen blocks and per step for trainable ones. Pointwise
//! convolutions are plain matrix products on the [N·H·W, C] view of the data, which is free in
//! NHWC; depthwise convolutions and pooling use the kernels of [`crate::ops`] (fast CPU kernels
//! for f32 on the CPU, Candle's own ops on a GPU or in bf16: [`crate::ops::portable`]).

use crate::layers::{self, Block, BN_EPSILON};
use crate::ops::{
    depthwise::depthwise_conv2d_opt, fused::scale_columns, im2col::im2col, linear::linear, maxpool::max_pool2d, Padding,
};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Which blocks take part in training (frozen blocks run on pre-folded weights), and the float
/// type of the computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XceptionOptions {
    /// Blocks with this 1-based index and above are trainable; `None` freezes the whole base.
    pub trainable_from: Option<usize>,
    /// Float type the blocks compute in. Weights stay f32 (they are what training updates) and
    /// are cast at use; the input is cast on the way in and the output back to f32, so callers
    /// see f32 either way. `BF16` is mixed precision for GPUs; the CPU kernels are f32 only (any
    /// other type takes [`crate::ops::portable`]).
    pub compute_dtype: DType,
}

impl Default for XceptionOptions {
    fn default() -> Self {
        Self { trainable_from: None, compute_dtype: DType::F32 }
    }
}

/// How a layer is built: trainable or frozen, and its compute type.
#[derive(Debug, Clone, Copy)]
struct Mode {
    trainable: bool,
    dtype: DType,
}

/// `t` in the float type `dtype` (a no-op when it already is).
fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

/// Batch-norm statistics and affine parameters of one layer.
#[derive(Debug, Clone)]
struct BatchNorm {
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
}

impl BatchNorm {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            gamma: vb.get(c, "gamma")?,
            beta: vb.get(c, "beta")?,
            mean: vb.get(c, "moving_mean")?,
            var: vb.get(c, "moving_variance")?,
        })
    }

    /// Folds the inference-mode normalisation into a [K, C] weight matrix: `(w·s, β − μ·s)` with
    /// `s = γ / sqrt(σ² + ε)`.
    fn fold(&self, w: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = self.gamma.div(&(self.var.affine(1.0, BN_EPSILON)?.sqrt()?))?;
        let b = self.beta.sub(&self.mean.mul(&s)?)?;
        Ok((scale_columns(w, &s)?, b))
    }
}

/// A [K, C] weight matrix followed by batch-norm, as one affine map `x·W' + b'`.
#[derive(Debug, Clone)]
struct FoldedAffine {
    w: Tensor,
    bn: BatchNorm,
    /// Frozen layers: the folded weights, already in the compute type.
    folded: Option<(Tensor, Tensor)>,
    dtype: DType,
}

impl FoldedAffine {
    fn new(w: Tensor, bn: BatchNorm, Mode { trainable, dtype }: Mode) -> Result<Self> {
        let folded = if trainable {
            None
        } else {
            let (w, b) = bn.fold(&w)?;
            Some((cast(&w, dtype)?.detach(), cast(&b, dtype)?.detach()))
        };
        Ok(Self { w, bn, folded, dtype })
    }

    /// The folded weights in the compute type (trainable ones folded, then cast, at every call
    /// so that gradients reach the f32 weights).
    fn weights(&self) -> Result<(Tensor, Tensor)> {
        match &self.folded {
            Some(f) => Ok(f.clone()),
            None => {
                let (w, b) = self.bn.fold(&self.w)?;
                Ok((cast(&w, self.dtype)?, cast(&b, self.dtype)?))
            }
        }
    }

    /// Applies the map to the rows of `x2d` [M, K], then relu if asked.
    fn forward(&self, x2d: &Tensor, relu: bool) -> Result<Tensor> {
        let (w, b) = self.weights()?;
        linear(x2d, &w, &b, relu)
    }
}

/// A dense convolution (Keras kernel [KH, KW, Cin, Cout]) followed by batch-norm.
#[derive(Debug, Clone)]
struct ConvBn {
    affine: FoldedAffine,
    k: usize,
    cin: usize,
    stride: usize,
    padding: Padding,
}

impl ConvBn {
    fn new(
        vb: &VarBuilder,
        name: &str,
        k: usize,
        (cin, cout): (usize, usize),
        stride: usize,
        padding: Padding,
        mode: Mode,
    ) -> Result<Self> {
        let w = vb.pp(name).get((k, k, cin, cout), "kernel")?.reshape((k * k * cin, cout))?;
        let bn = BatchNorm::new(vb.pp(format!("{name}_bn")), cout)?;
        Ok(Self { affine: FoldedAffine::new(w, bn, mode)?, k, cin, stride, padding })
    }

    fn forward(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let p = im2col(x, self.k, self.k, self.stride, self.padding)?;
        let (n, h, w, kc) = p.dims4()?;
        debug_assert_eq!(kc, self.k * self.k * self.cin);
        let y = self.affine.forward(&p.reshape((n * h * w, kc))?, relu)?;
        y.reshape((n, h, w, y.dim(1)?))
    }
}

/// A separable convolution (3x3 depthwise, then pointwise) followed by batch-norm.
#[derive(Debug, Clone)]
struct SepConvBn {
    depthwise: Tensor,
    pointwise: FoldedAffine,
    dtype: DType,
}

impl SepConvBn {
    fn new(vb: &VarBuilder, name: &str, cin: usize, cout: usize, mode: Mode) -> Result<Self> {
        let v = vb.pp(name);
        let depthwise = v.get((3, 3, cin), "depthwise")?;
        let pw = v.get((cin, cout), "pointwise")?;
        let bn = BatchNorm::new(vb.pp(format!("{name}_bn")), cout)?;
        let depthwise = if mode.trainable { depthwise } else { cast(&depthwise, mode.dtype)?.detach() };
        Ok(Self { depthwise, pointwise: FoldedAffine::new(pw, bn, mode)?, dtype: mode.dtype })
    }

    /// `relu_in`: relu on the input (fused into the depthwise kernel); `relu_out` on the output.
    fn forward(&self, x: &Tensor, relu_in: bool, relu_out: bool) -> Result<Tensor> {
        let d = depthwise_conv2d_opt(x, &cast(&self.depthwise, self.dtype)?, Padding::Same, relu_in)?;
        let (n, h, w, c) = d.dims4()?;
        let y = self.pointwise.forward(&d.reshape((n * h * w, c))?, relu_out)?;
        y.reshape((n, h, w, y.dim(1)?))
    }
}

/// Receives named intermediate outputs (Keras layer names) during a forward pass.
pub type Taps<'a> = &'a mut dyn FnMut(&str, &Tensor);

#[derive(Debug, Clone)]
enum BlockImpl {
    Stem { conv1: ConvBn, conv2: ConvBn },
    Down { index: usize, relu_first: bool, sep1: SepConvBn, sep2: SepConvBn, shortcut: ConvBn },
    Middle { index: usize, seps: [SepConvBn; 3] },
    Exit { sep1: SepConvBn, sep2: SepConvBn },
}

impl BlockImpl {
    fn new(spec: &Block, vb: &VarBuilder, mode: Mode) -> Result<Self> {
        let sep = |i, cin, cout| SepConvBn::new(vb, &layers::sepconv_name(spec.index(), i), cin, cout, mode);
        Ok(match *spec {
            Block::Stem => BlockImpl::Stem {
                conv1: ConvBn::new(vb, "block1_conv1", 3, (3, 32), 2, Padding::Valid, mode)?,
                conv2: ConvBn::new(vb, "block1_conv2", 3, (32, 64), 1, Padding::Valid, mode)?,
            },
            Block::Down { index, cin, f1, f2, relu_first } => BlockImpl::Down {
                index,
                relu_first,
                sep1: sep(1, cin, f1)?,
                sep2: sep(2, f1, f2)?,
                shortcut: ConvBn::new(vb, &layers::shortcut_name(index), 1, (cin, f2), 2, Padding::Same, mode)?,
            },
            Block::Middle { index } => {
                BlockImpl::Middle { index, seps: [sep(1, 728, 728)?, sep(2, 728, 728)?, sep(3, 728, 728)?] }
            }
            Block::Exit => BlockImpl::Exit { sep1: sep(1, 1024, 1536)?, sep2: sep(2, 1536, 2048)? },
        })
    }

    fn forward(&self, x: &Tensor, tap: Taps) -> Result<Tensor> {
        match self {
            BlockImpl::Stem { conv1, conv2 } => {
                let x = conv1.forward(x, true)?;
                tap("block1_conv1_act", &x);
                let x = conv2.forward(&x, true)?;
                tap("block1_conv2_act", &x);
                Ok(x)
            }
            BlockImpl::Down { index, relu_first, sep1, sep2, shortcut } => {
                let residual = shortcut.forward(x, false)?;
                let y = sep1.forward(x, *relu_first, false)?;
                tap(&format!("block{index}_sepconv1_bn"), &y);
                let y = sep2.forward(&y, true, false)?;
                tap(&format!("block{index}_sepconv2_bn"), &y);
                let y = max_pool2d(&y, 3, 2, Padding::Same)?;
                tap(&format!("block{index}_pool"), &y);
                let y = (y + residual)?;
                tap(&format!("block{index}_add"), &y);
                Ok(y)
            }
            BlockImpl::Middle { index, seps } => {
                let mut y = x.clone();
                for (i, s) in seps.iter().enumerate() {
                    y = s.forward(&y, true, false)?;
                    tap(&format!("block{index}_sepconv{}_bn", i + 1), &y);
                }
                let y = (y + x)?;
                tap(&format!("block{index}_add"), &y);
                Ok(y)
            }
            BlockImpl::Exit { sep1, sep2 } => {
                let y = sep1.forward(x, false, true)?;
                tap("block14_sepconv1_act", &y);
                let y = sep2.forward(&y, false, true)?;
                tap("block14_sepconv2_act", &y);
                Ok(y)
            }
        }
    }
}

/// The Xception base (no top): [N, H, W, 3] in [-1, 1] → [N, h, w, 2048].
#[derive(Debug, Clone)]
pub struct Xception {
    blocks: Vec<BlockImpl>,
    dtype: DType,
}

impl Xception {
    /// Builds the base from tensors named as in [`layers::base_tensors`].
    pub fn new(vb: VarBuilder, opts: XceptionOptions) -> Result<Self> {
        let blocks = layers::blocks()
            .iter()
            .map(|b| {
                BlockImpl::new(
                    b,
                    &vb,
                    Mode { trainable: opts.trainable_from.is_some_and(|t| b.index() >= t), dtype: opts.compute_dtype },
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self { blocks, dtype: opts.compute_dtype })
    }

    /// Runs blocks `from..=to` (1-based) on `x`, the output of block `from - 1` (or the image).
    /// The trainer caches the output of the frozen blocks and runs only the rest each epoch.
    pub fn forward_blocks(&self, x: &Tensor, from: usize, to: usize, tap: Taps) -> Result<Tensor> {
        if from == 0 || from > to || to > self.blocks.len() {
            candle_core::bail!("blocks {from}..={to} are not within 1..={}", self.blocks.len())
        }
        let mut x = cast(x, self.dtype)?;
        if from == 1 {
            let (_, h, w, c) = x.dims4()?;
            if h < layers::MIN_INPUT_SIZE || w < layers::MIN_INPUT_SIZE || c != 3 {
                candle_core::bail!(
                    "Xception needs [N, H, W, 3] input with H, W >= {}, got {:?}",
                    layers::MIN_INPUT_SIZE,
                    x.dims()
                )
            }
        }
        for b in &self.blocks[from - 1..to] {
            x = b.forward(&x, tap)?;
        }
        cast(&x, DType::F32)
    }

    /// The feature map [N, h, w, 2048], reporting intermediate outputs to `tap`.
    pub fn forward_with_taps(&self, x: &Tensor, tap: Taps) -> Result<Tensor> {
        self.forward_blocks(x, 1, self.blocks.len(), tap)
    }
}

/// Global average pooling of an NHWC feature map: [N, h, w, C] → [N, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    x.reshape((n, h * w, c))?.mean(1)
}

impl Module for Xception {
    /// The feature map [N, h, w, 2048].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_taps(x, &mut |_, _| {})
    }
}
