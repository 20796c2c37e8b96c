//! Xception (Chollet 2017) exactly as `keras.applications.Xception(include_top=False)`, on
//! channels-last data: input [N, H, W, 3] scaled to [-1, 1], output [N, h, w, 2048].
//!
//! Every convolution is followed by a batch-norm layer that runs in inference mode (Keras keeps
//! it so when fine-tuning, and so do we), so each conv + BN pair is one affine map, folded into
//! the convolution's weights once for frozen blocks and per step for trainable ones. Pointwise
//! convolutions are plain matrix products on the [N·H·W, C] view of the data, which is free in
//! NHWC; depthwise convolutions and pooling use the kernels of [`crate::ops`] (fast CPU kernels
//! for f32 on the CPU, Candle's own ops on a GPU or in bf16: [`crate::ops::portable`]).

use crate::layers::{self, Block, ConvSpec, Relu, Residual, SepConvSpec, BN_EPSILON};
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
    spec: ConvSpec,
    /// Name of the output this layer reports to a tap (Keras' layer name).
    tap: String,
}

impl ConvBn {
    fn new(vb: &VarBuilder, spec: &ConvSpec, mode: Mode) -> Result<Self> {
        let (k, cin, cout) = (spec.kernel, spec.cin, spec.cout);
        let w = vb.pp(&spec.name).get((k, k, cin, cout), "kernel")?.reshape((k * k * cin, cout))?;
        let bn = BatchNorm::new(vb.pp(format!("{}_bn", spec.name)), cout)?;
        Ok(Self { affine: FoldedAffine::new(w, bn, mode)?, spec: spec.clone(), tap: tap_name(&spec.name, spec.relu) })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        let x = if s.relu == Relu::Before { x.relu()? } else { x.clone() };
        let p = im2col(&x, s.kernel, s.kernel, s.stride, s.padding)?;
        let (n, h, w, kc) = p.dims4()?;
        debug_assert_eq!(kc, s.kernel * s.kernel * s.cin);
        let y = self.affine.forward(&p.reshape((n * h * w, kc))?, s.relu == Relu::After)?;
        y.reshape((n, h, w, y.dim(1)?))
    }
}

/// A separable convolution (3x3 depthwise, then pointwise) followed by batch-norm.
#[derive(Debug, Clone)]
struct SepConvBn {
    depthwise: Tensor,
    pointwise: FoldedAffine,
    dtype: DType,
    relu: Relu,
    tap: String,
    /// The depthwise output's name for taps: `{name}_depthwise` (no Keras layer gives it).
    depthwise_tap: String,
}

impl SepConvBn {
    fn new(vb: &VarBuilder, spec: &SepConvSpec, mode: Mode) -> Result<Self> {
        let v = vb.pp(&spec.name);
        let depthwise = v.get((3, 3, spec.cin), "depthwise")?;
        let pw = v.get((spec.cin, spec.cout), "pointwise")?;
        let bn = BatchNorm::new(vb.pp(format!("{}_bn", spec.name)), spec.cout)?;
        let depthwise = if mode.trainable { depthwise } else { cast(&depthwise, mode.dtype)?.detach() };
        Ok(Self {
            depthwise,
            pointwise: FoldedAffine::new(pw, bn, mode)?,
            dtype: mode.dtype,
            relu: spec.relu,
            tap: tap_name(&spec.name, spec.relu),
            depthwise_tap: format!("{}_depthwise", spec.name),
        })
    }

    /// The ReLU before is fused into the depthwise kernel, the one after into the pointwise
    /// product.
    fn forward(&self, x: &Tensor, tap: Taps) -> Result<Tensor> {
        let d = depthwise_conv2d_opt(x, &cast(&self.depthwise, self.dtype)?, Padding::Same, self.relu == Relu::Before)?;
        tap(&self.depthwise_tap, &d);
        let (n, h, w, c) = d.dims4()?;
        let y = self.pointwise.forward(&d.reshape((n * h * w, c))?, self.relu == Relu::After)?;
        y.reshape((n, h, w, y.dim(1)?))
    }
}

/// The Keras layer whose output a convolution's output equals: its activation when the ReLU
/// comes after it, else its batch-norm.
fn tap_name(name: &str, relu: Relu) -> String {
    if relu == Relu::After {
        format!("{name}_act")
    } else {
        format!("{name}_bn")
    }
}

/// Receives named intermediate outputs (Keras layer names) during a forward pass.
pub type Taps<'a> = &'a mut dyn FnMut(&str, &Tensor);

/// A block's residual branch with its weights.
#[derive(Debug, Clone)]
enum ResidualImpl {
    Identity,
    Conv(ConvBn),
}

/// A block of [`layers::blocks`] with its weights.
#[derive(Debug, Clone)]
struct BlockImpl {
    index: usize,
    convs: Vec<ConvBn>,
    sepconvs: Vec<SepConvBn>,
    pool: bool,
    residual: Option<ResidualImpl>,
}

impl BlockImpl {
    fn new(spec: &Block, vb: &VarBuilder, mode: Mode) -> Result<Self> {
        Ok(Self {
            index: spec.index,
            convs: spec.convs.iter().map(|c| ConvBn::new(vb, c, mode)).collect::<Result<_>>()?,
            sepconvs: spec.sepconvs.iter().map(|s| SepConvBn::new(vb, s, mode)).collect::<Result<_>>()?,
            pool: spec.pool,
            residual: match &spec.residual {
                None => None,
                Some(Residual::Identity) => Some(ResidualImpl::Identity),
                Some(Residual::Conv(c)) => Some(ResidualImpl::Conv(ConvBn::new(vb, c, mode)?)),
            },
        })
    }

    fn forward(&self, x: &Tensor, tap: Taps) -> Result<Tensor> {
        let residual = match &self.residual {
            None => None,
            Some(ResidualImpl::Identity) => Some(x.clone()),
            Some(ResidualImpl::Conv(conv)) => {
                let r = conv.forward(x)?;
                tap(&conv.tap, &r);
                Some(r)
            }
        };
        let mut y = x.clone();
        for c in &self.convs {
            y = c.forward(&y)?;
            tap(&c.tap, &y);
        }
        for s in &self.sepconvs {
            y = s.forward(&y, tap)?;
            tap(&s.tap, &y);
        }
        if self.pool {
            y = max_pool2d(&y, layers::POOL.0, layers::POOL.1, Padding::Same)?;
            tap(&format!("block{}_pool", self.index), &y);
        }
        if let Some(r) = residual {
            y = (y + r)?;
            tap(&format!("block{}_add", self.index), &y);
        }
        Ok(y)
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
                    Mode { trainable: opts.trainable_from.is_some_and(|t| b.index >= t), dtype: opts.compute_dtype },
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
