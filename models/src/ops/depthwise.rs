//! Depthwise 2-D convolution (one 2-D filter per channel, stride 1) on NHWC data.
//!
//! Candle runs a grouped `conv2d` as one small convolution per channel, 65-130x slower than this
//! direct kernel, whose inner loop is a vectorised multiply-add over the contiguous channels.

use super::fused::mask_positive;
use super::{axpy, contiguous_f32, simd_fn, window_geom, AxisPad, Geom, Padding};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Depthwise convolution of `x` [N, H, W, C] with `kernel` [KH, KW, C], stride 1.
pub fn depthwise_conv2d(x: &Tensor, kernel: &Tensor, padding: Padding) -> Result<Tensor> {
    depthwise_conv2d_opt(x, kernel, padding, false)
}

/// [`depthwise_conv2d`] of `relu(x)` when `relu_input`, without materialising `relu(x)`.
pub fn depthwise_conv2d_opt(x: &Tensor, kernel: &Tensor, padding: Padding, relu_input: bool) -> Result<Tensor> {
    let (kh, kw, kc) = kernel.dims3()?;
    let (_, h, w, c) = x.dims4()?;
    if kc != c {
        candle_core::bail!("depthwise_conv2d: kernel has {kc} channels, input has {c}")
    }
    if !super::portable::use_kernels(x) {
        return super::portable::depthwise_conv2d(x, kernel, padding, relu_input);
    }
    let (_, pad_h) = padding.resolve(h, kh, 1)?;
    let (_, pad_w) = padding.resolve(w, kw, 1)?;
    x.contiguous()?.apply_op2(&kernel.contiguous()?, DepthwiseConv2d { pad_h, pad_w, relu_input })
}

/// The op itself, with explicit padding; see [`depthwise_conv2d`].
#[derive(Debug, Clone, Copy)]
pub struct DepthwiseConv2d {
    pub pad_h: AxisPad,
    pub pad_w: AxisPad,
    /// Apply relu to the input as it is read (saves a pass over the activations).
    pub relu_input: bool,
}

impl DepthwiseConv2d {
    fn floor(&self) -> f32 {
        if self.relu_input {
            0.0
        } else {
            f32::NEG_INFINITY
        }
    }
}

/// Geometry shared by the depthwise forward and backward kernels: the sliding window's
/// ([`window_geom`], stride 1) plus the kernel's size and the padding.
#[derive(Debug, Clone, Copy)]
struct DepthwiseGeom {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    pad_h: AxisPad,
    pad_w: AxisPad,
}

impl DepthwiseGeom {
    fn new(x: &Layout, k: &Layout, pad_h: AxisPad, pad_w: AxisPad, op: &str) -> Result<Self> {
        let (kh, kw, kc) = match k.dims() {
            &[a, b, c] => (a, b, c),
            d => candle_core::bail!("{op}: kernel must be [KH, KW, C], got {d:?}"),
        };
        let Geom { n, h, w, c, oh, ow } = window_geom(x, (kh, kw), 1, pad_h, pad_w, op)?;
        if kc != c {
            candle_core::bail!("{op}: kernel has {kc} channels, input has {c}")
        }
        Ok(Self { n, h, w, c, kh, kw, oh, ow, pad_h, pad_w })
    }

    /// Output columns `ox` whose input column `ox + kx - pad_w.before` lies inside the image.
    #[inline(always)]
    fn ox_range(&self, kx: usize) -> std::ops::Range<usize> {
        let lo = self.pad_w.before.saturating_sub(kx);
        let hi = (self.w + self.pad_w.before).saturating_sub(kx).min(self.ow);
        lo..hi.max(lo)
    }

    /// Input row read by output row `oy` at kernel row `ky`, if inside the image.
    #[inline(always)]
    fn iy(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy + ky).checked_sub(self.pad_h.before).filter(|&iy| iy < self.h)
    }
}

/// Channels accumulated at once in registers by the forward kernel.
const CHUNK: usize = 32;

simd_fn! {
    /// One output row of the forward pass. For each output pixel and each chunk of channels, the
    /// taps are summed in registers and stored once. `floor` is 0 to apply relu to the input as
    /// it is read (Xception's relu → sepconv), or -inf for none.
    fn forward_row(g: &DepthwiseGeom, img: &[f32], k: &[f32], oy: usize, floor: f32, out: &mut [MaybeUninit<f32>]) {
        let c = g.c;
        for ox in 0..g.ow {
            let o = &mut out[ox * c..(ox + 1) * c];
            let mut c0 = 0;
            while c0 < c {
                let w = (c - c0).min(CHUNK);
                let mut acc = [0f32; CHUNK];
                for ky in 0..g.kh {
                    let Some(iy) = g.iy(oy, ky) else { continue };
                    for kx in 0..g.kw {
                        let Some(ix) = (ox + kx).checked_sub(g.pad_w.before).filter(|&ix| ix < g.w) else { continue };
                        let xs = &img[(iy * g.w + ix) * c + c0..][..w];
                        let ks = &k[(ky * g.kw + kx) * c + c0..][..w];
                        if let (Ok(xs), Ok(ks)) = (<&[f32; CHUNK]>::try_from(xs), <&[f32; CHUNK]>::try_from(ks)) {
                            for i in 0..CHUNK {
                                acc[i] += xs[i].max(floor) * ks[i];
                            }
                        } else {
                            for i in 0..w {
                                acc[i] += xs[i].max(floor) * ks[i];
                            }
                        }
                    }
                }
                o[c0..c0 + w].iter_mut().zip(&acc[..w]).for_each(|(o, a)| {
                    o.write(*a);
                });
                c0 += CHUNK;
            }
        }
    }
}

simd_fn! {
    /// One output row's contribution to the kernel gradient: `gk[ky, kx] += x[iy, ix] * g[ox]`.
    fn grad_kernel_row(g: &DepthwiseGeom, img: &[f32], grad: &[f32], oy: usize, floor: f32, gk: &mut [f32]) {
        let c = g.c;
        let mut xr = vec![0f32; c];
        for ky in 0..g.kh {
            let Some(iy) = g.iy(oy, ky) else { continue };
            let xrow = &img[iy * g.w * c..(iy + 1) * g.w * c];
            for kx in 0..g.kw {
                let acc = &mut gk[(ky * g.kw + kx) * c..][..c];
                for ox in g.ox_range(kx) {
                    let ix = ox + kx - g.pad_w.before;
                    xr.iter_mut().zip(&xrow[ix * c..(ix + 1) * c]).for_each(|(r, v)| *r = v.max(floor));
                    axpy(acc, &xr, &grad[ox * c..(ox + 1) * c]);
                }
            }
        }
    }
}

/// Forward pass on plain slices: returns the [N, OH, OW, C] output.
fn forward(g: &DepthwiseGeom, x: &[f32], k: &[f32], floor: f32) -> Vec<f32> {
    let (img_len, row_len) = (g.h * g.w * g.c, g.ow * g.c);
    let len = g.n * g.oh * row_len;
    // Every element is written exactly once by `forward_row`, so the buffer is not zeroed first.
    let mut out = Vec::with_capacity(len);
    if row_len > 0 {
        out.spare_capacity_mut()[..len].par_chunks_mut(row_len).enumerate().for_each(|(r, o)| {
            let (b, oy) = (r / g.oh, r % g.oh);
            forward_row(g, &x[b * img_len..(b + 1) * img_len], k, oy, floor, o);
        });
    }
    // SAFETY: the loop above initialised all `len` elements (rows of `row_len`, each element of
    // each row written once by `forward_row`).
    unsafe { out.set_len(len) };
    out
}

impl CustomOp2 for DepthwiseConv2d {
    fn name(&self) -> &'static str {
        "depthwise_conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = DepthwiseGeom::new(l1, l2, self.pad_h, self.pad_w, self.name())?;
        let (x, k) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        Ok((CpuStorage::F32(forward(&g, x, k, self.floor())), Shape::from((g.n, g.oh, g.ow, g.c))))
    }

    fn bwd(&self, x: &Tensor, k: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let mut gx = grad.apply_op2_no_bwd(k, &DepthwiseGradInput { fwd: *self })?;
        if self.relu_input {
            gx = mask_positive(&gx, x)?;
        }
        let gk = x.apply_op2_no_bwd(&grad, &DepthwiseGradKernel { fwd: *self, kernel_dims: k.dims3()? })?;
        Ok((Some(gx), Some(gk)))
    }
}

/// Gradient with respect to the input: the forward convolution of the output gradient with the
/// kernel flipped in both spatial axes, padded by `k - 1 - pad` on each side.
struct DepthwiseGradInput {
    fwd: DepthwiseConv2d,
}

impl CustomOp2 for DepthwiseGradInput {
    fn name(&self) -> &'static str {
        "depthwise_conv2d_grad_input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (grad, k) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let (kh, kw, c) = match l2.dims() {
            &[a, b, c] => (a, b, c),
            d => candle_core::bail!("{}: kernel must be [KH, KW, C], got {d:?}", self.name()),
        };
        let mut flipped = vec![0f32; k.len()];
        for ky in 0..kh {
            for kx in 0..kw {
                let src = ((kh - 1 - ky) * kw + (kw - 1 - kx)) * c;
                flipped[(ky * kw + kx) * c..][..c].copy_from_slice(&k[src..src + c]);
            }
        }
        let (p, q) = (self.fwd.pad_h, self.fwd.pad_w);
        let pad_h = AxisPad { before: kh - 1 - p.before, after: kh - 1 - p.after };
        let pad_w = AxisPad { before: kw - 1 - q.before, after: kw - 1 - q.after };
        let g = DepthwiseGeom::new(l1, l2, pad_h, pad_w, self.name())?;
        Ok((CpuStorage::F32(forward(&g, grad, &flipped, f32::NEG_INFINITY)), Shape::from((g.n, g.oh, g.ow, g.c))))
    }
}

/// Gradient with respect to the kernel, summed over the batch and all positions.
struct DepthwiseGradKernel {
    fwd: DepthwiseConv2d,
    kernel_dims: (usize, usize, usize),
}

impl CustomOp2 for DepthwiseGradKernel {
    fn name(&self) -> &'static str {
        "depthwise_conv2d_grad_kernel"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, grad) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let (kh, kw, c) = self.kernel_dims;
        let kl = Layout::contiguous((kh, kw, c));
        let g = DepthwiseGeom::new(l1, &kl, self.fwd.pad_h, self.fwd.pad_w, self.name())?;
        if l2.dims() != [g.n, g.oh, g.ow, g.c] {
            candle_core::bail!("{}: gradient shape {:?} does not match the output", self.name(), l2.dims())
        }
        let (img_len, row_len) = (g.h * g.w * g.c, g.ow * g.c);
        // Partial sums over fixed groups of rows, added up in order: the result does not depend
        // on how rayon schedules the work, so training runs are reproducible.
        const ROWS: usize = 8;
        let partials: Vec<Vec<f32>> = grad
            .par_chunks((row_len * ROWS).max(1))
            .enumerate()
            .map(|(chunk, rows)| {
                let mut acc = vec![0f32; kh * kw * c];
                for (i, grow) in rows.chunks(row_len.max(1)).enumerate() {
                    let r = chunk * ROWS + i;
                    let (b, oy) = (r / g.oh, r % g.oh);
                    grad_kernel_row(&g, &x[b * img_len..(b + 1) * img_len], grow, oy, self.fwd.floor(), &mut acc);
                }
                acc
            })
            .collect();
        let mut gk = vec![0f32; kh * kw * c];
        for p in &partials {
            gk.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(gk), Shape::from((kh, kw, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{numeric_grad_check, rand_tensor};
    use candle_core::Device;

    /// Plain reference: a direct loop over every output, tap and channel, with explicit padding.
    fn reference(x: &Tensor, k: &Tensor, padding: Padding) -> Vec<f32> {
        let (n, h, w, c) = x.dims4().unwrap();
        let (kh, kw, _) = k.dims3().unwrap();
        let (oh, ph) = padding.resolve(h, kh, 1).unwrap();
        let (ow, pw) = padding.resolve(w, kw, 1).unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let kv = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut out = vec![0f32; n * oh * ow * c];
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ch in 0..c {
                        let mut s = 0f32;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = oy as isize + ky as isize - ph.before as isize;
                                let ix = ox as isize + kx as isize - pw.before as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xi = ((b * h + iy as usize) * w + ix as usize) * c + ch;
                                s += xv[xi] * kv[(ky * kw + kx) * c + ch];
                            }
                        }
                        out[((b * oh + oy) * ow + ox) * c + ch] = s;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, kdims, padding) in [
            ((2, 7, 9, 5), (3, 3), Padding::Same),
            ((1, 6, 6, 16), (3, 3), Padding::Valid),
            ((3, 5, 4, 3), (1, 3), Padding::Same),
            ((1, 4, 5, 33), (5, 5), Padding::Same),
            ((2, 5, 5, 70), (3, 3), Padding::Same),
        ] {
            let x = rand_tensor(&[shape.0, shape.1, shape.2, shape.3], 1, &dev)?;
            let k = rand_tensor(&[kdims.0, kdims.1, shape.3], 2, &dev)?;
            for relu in [false, true] {
                let got = depthwise_conv2d_opt(&x, &k, padding, relu)?.flatten_all()?.to_vec1::<f32>()?;
                let want = reference(&if relu { x.relu()? } else { x.clone() }, &k, padding);
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{shape:?} {kdims:?} relu={relu}: {a} vs {b}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        for padding in [Padding::Same, Padding::Valid] {
            let x = rand_tensor(&[2, 5, 6, 3], 3, &dev)?;
            let k = rand_tensor(&[3, 3, 3], 4, &dev)?;
            numeric_grad_check(&[x.clone(), k.clone()], |t| depthwise_conv2d(&t[0], &t[1], padding))?;
            // Inputs kept away from relu's kink, so that no finite-difference step crosses it.
            let away = (x.sign()? * 0.1 + &x)?;
            numeric_grad_check(&[away, k], |t| depthwise_conv2d_opt(&t[0], &t[1], padding, true))?;
        }
        Ok(())
    }
}
