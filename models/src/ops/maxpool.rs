//! Max pooling on NHWC data with TensorFlow's 'same' padding, and its backward pass.
//!
//! Candle's `max_pool2d` has no padding and no backward when the kernel differs from the stride;
//! Xception pools 3x3 with stride 2 and 'same' padding in four places.

use super::{contiguous_f32, simd_fn, window_geom, AxisPad, Geom, Padding};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Max pooling of `x` [N, H, W, C] with a square `k`x`k` window and the given stride.
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, padding: Padding) -> Result<Tensor> {
    if !super::portable::use_kernels(x) {
        return super::portable::max_pool2d(x, k, stride, padding);
    }
    let (_, h, w, _) = x.dims4()?;
    let (_, pad_h) = padding.resolve(h, k, stride)?;
    let (_, pad_w) = padding.resolve(w, k, stride)?;
    x.contiguous()?.apply_op1(MaxPool2d { k, stride, pad_h, pad_w })
}

/// The op itself, with explicit padding; see [`max_pool2d`].
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d {
    pub k: usize,
    pub stride: usize,
    pub pad_h: AxisPad,
    pub pad_w: AxisPad,
}

impl MaxPool2d {
    fn geom(&self, l: &Layout, op: &str) -> Result<Geom> {
        if self.pad_h.before >= self.k || self.pad_w.before >= self.k {
            candle_core::bail!("{op}: padding must be smaller than the window")
        }
        window_geom(l, (self.k, self.k), self.stride, self.pad_h, self.pad_w, op)
    }

    /// The input positions of the window of output position `o` along one axis.
    #[inline(always)]
    fn window(&self, o: usize, pad: AxisPad, len: usize) -> std::ops::Range<usize> {
        let start = o * self.stride;
        let lo = start.saturating_sub(pad.before);
        let hi = (start + self.k).saturating_sub(pad.before).min(len);
        lo..hi
    }
}

simd_fn! {
    /// One output row: the channel-wise maximum over each window.
    fn forward_row(p: &MaxPool2d, g: &Geom, img: &[f32], oy: usize, out: &mut [f32]) {
        let c = g.c;
        out.fill(f32::NEG_INFINITY);
        for iy in p.window(oy, p.pad_h, g.h) {
            let xrow = &img[iy * g.w * c..(iy + 1) * g.w * c];
            for ox in 0..g.ow {
                let o = &mut out[ox * c..(ox + 1) * c];
                for ix in p.window(ox, p.pad_w, g.w) {
                    let v = &xrow[ix * c..(ix + 1) * c];
                    for i in 0..c {
                        o[i] = if v[i] > o[i] { v[i] } else { o[i] };
                    }
                }
            }
        }
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max_pool2d_same"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geom(l, self.name())?;
        let x = contiguous_f32(s, l, self.name())?;
        let (img_len, row_len) = (g.h * g.w * g.c, g.ow * g.c);
        let mut out = vec![0f32; g.n * g.oh * row_len];
        out.par_chunks_mut(row_len).enumerate().for_each(|(r, o)| {
            let (b, oy) = (r / g.oh, r % g.oh);
            forward_row(self, &g, &x[b * img_len..(b + 1) * img_len], oy, o);
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.oh, g.ow, g.c))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolGrad { fwd: *self })?))
    }
}

/// Routes each output gradient to the first maximum of its window (as TensorFlow does).
struct MaxPoolGrad {
    fwd: MaxPool2d,
}

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "max_pool2d_same_grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.fwd;
        let g = p.geom(l1, self.name())?;
        if l2.dims() != [g.n, g.oh, g.ow, g.c] {
            candle_core::bail!("{}: gradient shape {:?} does not match the output", self.name(), l2.dims())
        }
        let (x, grad) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let (img_len, out_len, c) = (g.h * g.w * g.c, g.oh * g.ow * g.c, g.c);
        let mut gx = vec![0f32; x.len()];
        gx.par_chunks_mut(img_len).enumerate().for_each(|(b, gimg)| {
            let img = &x[b * img_len..(b + 1) * img_len];
            let gout = &grad[b * out_len..(b + 1) * out_len];
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for ch in 0..c {
                        let (mut best, mut at) = (f32::NEG_INFINITY, usize::MAX);
                        for iy in p.window(oy, p.pad_h, g.h) {
                            for ix in p.window(ox, p.pad_w, g.w) {
                                let i = (iy * g.w + ix) * c + ch;
                                if img[i] > best || at == usize::MAX {
                                    (best, at) = (img[i], i);
                                }
                            }
                        }
                        if at != usize::MAX {
                            gimg[at] += gout[(oy * g.ow + ox) * c + ch];
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{numeric_grad_check, rand_tensor};
    use candle_core::Device;

    fn reference(x: &Tensor, k: usize, s: usize, padding: Padding) -> Vec<f32> {
        let (n, h, w, c) = x.dims4().unwrap();
        let (oh, ph) = padding.resolve(h, k, s).unwrap();
        let (ow, pw) = padding.resolve(w, k, s).unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut out = vec![f32::NEG_INFINITY; n * oh * ow * c];
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ch in 0..c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s + ky) as isize - ph.before as isize;
                                let ix = (ox * s + kx) as isize - pw.before as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let v = xv[((b * h + iy as usize) * w + ix as usize) * c + ch];
                                let o = &mut out[((b * oh + oy) * ow + ox) * c + ch];
                                *o = o.max(v);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Distinct values spaced well apart, so that a finite-difference step never changes which
    /// element of a window is the maximum.
    fn spaced(shape: &[usize], seed: u64) -> Result<Tensor> {
        let r = rand_tensor(shape, seed, &Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let mut idx: Vec<usize> = (0..r.len()).collect();
        idx.sort_by(|&a, &b| r[a].total_cmp(&r[b]));
        let mut v = vec![0f32; r.len()];
        for (rank, &i) in idx.iter().enumerate() {
            v[i] = rank as f32 * 0.05 - 1.0;
        }
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    #[test]
    fn forward_matches_reference() -> Result<()> {
        for (shape, k, s, padding) in [
            ([2, 7, 7, 5], 3, 2, Padding::Same),
            ([1, 8, 6, 16], 3, 2, Padding::Same),
            ([1, 9, 9, 3], 3, 2, Padding::Valid),
            ([2, 5, 5, 9], 2, 2, Padding::Same),
        ] {
            let x = rand_tensor(&shape, 7, &Device::Cpu)?;
            let got = max_pool2d(&x, k, s, padding)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(got, reference(&x, k, s, padding), "{shape:?} k{k} s{s} {padding:?}");
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        for shape in [[2, 7, 7, 3], [1, 6, 5, 2]] {
            let x = spaced(&shape, 5)?;
            numeric_grad_check(&[x], |t| max_pool2d(&t[0], 3, 2, Padding::Same))?;
        }
        Ok(())
    }
}
