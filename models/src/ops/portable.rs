//! The same layers as the fast CPU kernels, written with Candle's own tensor ops only, so that
//! they run on any device Candle has (CUDA) and in any float type (bf16), with Candle's autograd.
//!
//! The public functions of [`crate::ops`] take this path for tensors that are not f32 on the CPU.
//! On the CPU the two paths are tested against each other (values and gradients), so what runs
//! on a GPU is the code checked here, on Candle's CUDA kernels instead of its CPU ones.

use super::{AxisPad, Padding};
use candle_core::{Result, Tensor};

/// Whether a tensor takes the fast CPU kernels (f32 on the CPU) or this module.
pub(crate) fn use_kernels(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// `x` `[M, K]` · `w` `[K, N]` + `b` `[N]`, then relu if asked.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    let y = x.matmul(w)?.broadcast_add(b)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// Pads the two spatial axes of an NHWC tensor with `value` (0 or -inf).
fn pad_spatial(x: &Tensor, pad_h: AxisPad, pad_w: AxisPad, value: f64) -> Result<Tensor> {
    let mut x = x.clone();
    for (dim, pad) in [(1, pad_h), (2, pad_w)] {
        if pad.before == 0 && pad.after == 0 {
            continue;
        }
        let block = |len: usize| -> Result<Option<Tensor>> {
            if len == 0 {
                return Ok(None);
            }
            let mut shape = x.dims().to_vec();
            shape[dim] = len;
            let t = Tensor::zeros(shape, x.dtype(), x.device())?;
            Ok(Some(if value == 0.0 { t } else { (t + value)? }))
        };
        let parts: Vec<Tensor> =
            [block(pad.before)?, Some(x.clone()), block(pad.after)?].into_iter().flatten().collect();
        x = Tensor::cat(&parts, dim)?;
    }
    Ok(x)
}

/// `x[:, y0 :: stride][:oh, x0 :: stride][:ow]` of an NHWC tensor (rows past the end must not be
/// read: the caller pads first).
fn strided_view(x: &Tensor, (y0, x0): (usize, usize), stride: usize, (oh, ow): (usize, usize)) -> Result<Tensor> {
    let mut x = x.clone();
    for (dim, start, len) in [(1, y0, oh), (2, x0, ow)] {
        if stride == 1 {
            x = x.narrow(dim, start, len)?;
            continue;
        }
        // Take stride·len elements (padding with zeros past the end: never read), then keep the
        // first of every `stride`.
        let avail = x.dim(dim)? - start;
        let take = avail.min(stride * len);
        x = x.narrow(dim, start, take)?;
        if take < stride * len {
            x = x.pad_with_zeros(dim, 0, stride * len - take)?;
        }
        let mut shape = x.dims().to_vec();
        shape[dim] = len;
        shape.insert(dim + 1, stride);
        x = x.contiguous()?.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?;
    }
    Ok(x)
}

/// Output size of a window op along one (padded) axis.
fn out_len(padded: usize, k: usize, stride: usize, op: &str) -> Result<usize> {
    if padded < k || stride == 0 {
        candle_core::bail!("{op}: input of {padded} px (padded) is smaller than the {k} px window (or stride 0)")
    }
    Ok((padded - k) / stride + 1)
}

/// Depthwise convolution of `x` [N, H, W, C] (of `relu(x)` if asked) with `kernel` [KH, KW, C],
/// stride 1: the sum over the taps of the shifted input times the tap's per-channel weights.
pub fn depthwise_conv2d(x: &Tensor, kernel: &Tensor, padding: Padding, relu_input: bool) -> Result<Tensor> {
    let (kh, kw, kc) = kernel.dims3()?;
    let (_, h, w, c) = x.dims4()?;
    if kc != c {
        candle_core::bail!("depthwise_conv2d: kernel has {kc} channels, input has {c}")
    }
    let (oh, pad_h) = padding.resolve(h, kh, 1)?;
    let (ow, pad_w) = padding.resolve(w, kw, 1)?;
    let x = if relu_input { x.relu()? } else { x.clone() };
    let x = pad_spatial(&x, pad_h, pad_w, 0.0)?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..kh {
        for kx in 0..kw {
            let tap = kernel.narrow(0, ky, 1)?.narrow(1, kx, 1)?.reshape(c)?;
            let term = x.narrow(1, ky, oh)?.narrow(2, kx, ow)?.broadcast_mul(&tap)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("depthwise_conv2d: empty kernel".into()))
}

/// Max pooling of `x` [N, H, W, C] with a `k`x`k` window: the maximum over the window's taps of
/// strided views of the input padded with -inf.
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, padding: Padding) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let (_, pad_h) = padding.resolve(h, k, stride)?;
    let (_, pad_w) = padding.resolve(w, k, stride)?;
    let oh = out_len(h + pad_h.before + pad_h.after, k, stride, "max_pool2d")?;
    let ow = out_len(w + pad_w.before + pad_w.after, k, stride, "max_pool2d")?;
    let x = pad_spatial(x, pad_h, pad_w, f64::NEG_INFINITY)?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..k {
        for kx in 0..k {
            let v = strided_view(&x, (ky, kx), stride, (oh, ow))?;
            acc = Some(match acc {
                None => v,
                Some(a) => a.maximum(&v)?,
            });
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("max_pool2d: empty window".into()))
}

/// The patches of `x` [N, H, W, C] for a `kh`x`kw` kernel: [N, OH, OW, KH·KW·C], taps in the
/// order of a Keras kernel [KH, KW, C, C_out] read as a matrix.
pub fn im2col(x: &Tensor, kh: usize, kw: usize, stride: usize, padding: Padding) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let (_, pad_h) = padding.resolve(h, kh, stride)?;
    let (_, pad_w) = padding.resolve(w, kw, stride)?;
    let oh = out_len(h + pad_h.before + pad_h.after, kh, stride, "im2col")?;
    let ow = out_len(w + pad_w.before + pad_w.after, kw, stride, "im2col")?;
    let x = pad_spatial(x, pad_h, pad_w, 0.0)?;
    let mut taps = Vec::with_capacity(kh * kw);
    for ky in 0..kh {
        for kx in 0..kw {
            taps.push(strided_view(&x, (ky, kx), stride, (oh, ow))?);
        }
    }
    Tensor::cat(&taps, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rand_tensor;
    use crate::ops::{depthwise, fused, im2col as fast_im2col, linear as fast_linear, maxpool};
    use candle_core::{Device, Var};

    /// Largest absolute difference of two tensors.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Runs `fast` (the CPU kernels) and `portable` on the same inputs and compares the outputs
    /// and the gradients of a random weighting of them with respect to every input.
    fn same_values_and_gradients(
        inputs: &[Tensor],
        fast: impl Fn(&[Tensor]) -> Result<Tensor>,
        portable: impl Fn(&[Tensor]) -> Result<Tensor>,
        what: &str,
    ) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fast(&ts).unwrap(), portable(&ts).unwrap());
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let d = max_diff(&a, &b);
        assert!(d < 1e-4, "{what}: outputs differ by {d}");
        let r = rand_tensor(a.dims(), 77, &Device::Cpu).unwrap();
        let ga = a.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = b.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (x, y) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
            let d = max_diff(x, y);
            assert!(d < 1e-3, "{what}: gradients of input {i} differ by {d}");
        }
    }

    #[test]
    fn linear_matches_the_kernel() {
        let dev = Device::Cpu;
        let t = [
            rand_tensor(&[37, 20], 1, &dev).unwrap(),
            rand_tensor(&[20, 9], 2, &dev).unwrap(),
            rand_tensor(&[9], 3, &dev).unwrap(),
        ];
        for relu in [false, true] {
            same_values_and_gradients(
                &t,
                |t| fast_linear::linear(&t[0], &t[1], &t[2], relu),
                |t| linear(&t[0], &t[1], &t[2], relu),
                &format!("linear relu={relu}"),
            );
        }
        let (w, s) = (rand_tensor(&[20, 9], 4, &dev).unwrap(), rand_tensor(&[9], 5, &dev).unwrap());
        same_values_and_gradients(
            &[w, s],
            |t| fused::scale_columns(&t[0], &t[1]),
            |t| t[0].broadcast_mul(&t[1]),
            "scale_columns",
        );
    }

    #[test]
    fn depthwise_matches_the_kernel() {
        let dev = Device::Cpu;
        for (h, w, padding, relu) in
            [(7, 9, Padding::Same, false), (8, 8, Padding::Same, true), (6, 5, Padding::Valid, true)]
        {
            let t = [rand_tensor(&[2, h, w, 11], 6, &dev).unwrap(), rand_tensor(&[3, 3, 11], 7, &dev).unwrap()];
            same_values_and_gradients(
                &t,
                |t| depthwise::depthwise_conv2d_opt(&t[0], &t[1], padding, relu),
                |t| depthwise_conv2d(&t[0], &t[1], padding, relu),
                &format!("depthwise {h}x{w} {padding:?} relu={relu}"),
            );
        }
    }

    #[test]
    fn max_pool_matches_the_kernel() {
        let dev = Device::Cpu;
        // Xception's pools (3x3/2 'same') on odd and even sizes, and a 'valid' one.
        for (h, w, padding) in [(9, 9, Padding::Same), (8, 10, Padding::Same), (7, 6, Padding::Valid)] {
            let x = rand_tensor(&[2, h, w, 5], 8, &dev).unwrap();
            same_values_and_gradients(
                &[x],
                |t| maxpool::max_pool2d(&t[0], 3, 2, padding),
                |t| max_pool2d(&t[0], 3, 2, padding),
                &format!("max_pool {h}x{w} {padding:?}"),
            );
        }
    }

    #[test]
    fn im2col_matches_the_kernel() {
        let dev = Device::Cpu;
        // The stem (3x3/2 and 3x3/1 'valid') and the strided 1x1 'same' shortcuts.
        for (h, w, k, stride, padding) in [
            (15, 15, 3, 2, Padding::Valid),
            (8, 9, 3, 1, Padding::Valid),
            (9, 9, 1, 2, Padding::Same),
            (10, 7, 1, 2, Padding::Same),
        ] {
            let x = rand_tensor(&[2, h, w, 4], 9, &dev).unwrap();
            same_values_and_gradients(
                &[x],
                |t| fast_im2col::im2col(&t[0], k, k, stride, padding),
                |t| im2col(&t[0], k, k, stride, padding),
                &format!("im2col {h}x{w} k{k} s{stride} {padding:?}"),
            );
        }
    }
}
