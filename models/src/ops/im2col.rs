//! Patch extraction (im2col) on NHWC data, so that a dense convolution becomes one matrix
//! product: [N·OH·OW, KH·KW·C] x [KH·KW·C, C_out], the Keras kernel [KH, KW, C, C_out] read as
//! a matrix as it lies in memory. Used by Xception's two stem convolutions and its strided 1x1
//! shortcut convolutions (where it is a plain subsampling).

use super::{contiguous_f32, window_geom, AxisPad, Geom, Padding};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A dense 2-D convolution of `x` [N, H, W, C] with `kernel` [KH, KW, C, C_out] (Keras layout).
pub fn conv2d(x: &Tensor, kernel: &Tensor, stride: usize, padding: Padding) -> Result<Tensor> {
    let (kh, kw, c, co) = kernel.dims4()?;
    let (n, _, _, xc) = x.dims4()?;
    if c != xc {
        candle_core::bail!("conv2d: kernel expects {c} input channels, input has {xc}")
    }
    let patches = im2col(x, kh, kw, stride, padding)?;
    let (_, oh, ow, _) = patches.dims4()?;
    patches.reshape((n * oh * ow, kh * kw * c))?.matmul(&kernel.reshape((kh * kw * c, co))?)?.reshape((n, oh, ow, co))
}

/// The patches of `x` [N, H, W, C] for a `kh`x`kw` kernel: [N, OH, OW, KH·KW·C].
pub fn im2col(x: &Tensor, kh: usize, kw: usize, stride: usize, padding: Padding) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let (_, pad_h) = padding.resolve(h, kh, stride)?;
    let (_, pad_w) = padding.resolve(w, kw, stride)?;
    if kh == 1 && kw == 1 && stride == 1 {
        return Ok(x.clone());
    }
    if !super::portable::use_kernels(x) {
        return super::portable::im2col(x, kh, kw, stride, padding);
    }
    x.contiguous()?.apply_op1(Im2Col { kh, kw, stride, pad_h, pad_w })
}

/// The patch-extraction op; see [`conv2d`].
#[derive(Debug, Clone, Copy)]
pub struct Im2Col {
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad_h: AxisPad,
    pub pad_w: AxisPad,
}

impl Im2Col {
    fn geom(&self, l: &Layout, op: &str) -> Result<Geom> {
        window_geom(l, (self.kh, self.kw), self.stride, self.pad_h, self.pad_w, op)
    }

    /// Input index of tap `k` of output position `o` on an axis, if inside the image.
    #[inline(always)]
    fn src(&self, o: usize, k: usize, pad: AxisPad, len: usize) -> Option<usize> {
        (o * self.stride + k).checked_sub(pad.before).filter(|&i| i < len)
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geom(l, self.name())?;
        let x = contiguous_f32(s, l, self.name())?;
        let (c, kk) = (g.c, self.kh * self.kw);
        let (img_len, row_len) = (g.h * g.w * c, g.ow * kk * c);
        let mut out = vec![0f32; g.n * g.oh * row_len];
        out.par_chunks_mut(row_len).enumerate().for_each(|(r, o)| {
            let (b, oy) = (r / g.oh, r % g.oh);
            let img = &x[b * img_len..(b + 1) * img_len];
            for ky in 0..self.kh {
                let Some(iy) = self.src(oy, ky, self.pad_h, g.h) else { continue };
                for ox in 0..g.ow {
                    for kx in 0..self.kw {
                        let Some(ix) = self.src(ox, kx, self.pad_w, g.w) else { continue };
                        let dst = (ox * kk + ky * self.kw + kx) * c;
                        o[dst..dst + c].copy_from_slice(&img[(iy * g.w + ix) * c..][..c]);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.oh, g.ow, kk * c))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = x.dims4()?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im { fwd: *self, dims })?))
    }
}

/// The adjoint of [`Im2Col`]: adds every patch element back onto the pixel it came from.
struct Col2Im {
    fwd: Im2Col,
    dims: (usize, usize, usize, usize),
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.fwd;
        let g = p.geom(&Layout::contiguous(self.dims), self.name())?;
        let (c, kk) = (g.c, p.kh * p.kw);
        if l.dims() != [g.n, g.oh, g.ow, kk * c] {
            candle_core::bail!("{}: gradient shape {:?} does not match the patches", self.name(), l.dims())
        }
        let grad = contiguous_f32(s, l, self.name())?;
        let (img_len, out_len) = (g.h * g.w * c, g.oh * g.ow * kk * c);
        let mut gx = vec![0f32; g.n * img_len];
        gx.par_chunks_mut(img_len).enumerate().for_each(|(b, gimg)| {
            let gp = &grad[b * out_len..(b + 1) * out_len];
            for oy in 0..g.oh {
                for ky in 0..p.kh {
                    let Some(iy) = p.src(oy, ky, p.pad_h, g.h) else { continue };
                    for ox in 0..g.ow {
                        for kx in 0..p.kw {
                            let Some(ix) = p.src(ox, kx, p.pad_w, g.w) else { continue };
                            let src = ((oy * g.ow + ox) * kk + ky * p.kw + kx) * c;
                            let dst = &mut gimg[(iy * g.w + ix) * c..][..c];
                            dst.iter_mut().zip(&gp[src..src + c]).for_each(|(d, s)| *d += s);
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(gx), Shape::from(self.dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{numeric_grad_check, rand_tensor};
    use candle_core::Device;

    /// Candle's own NCHW convolution, with the padding applied explicitly, as the reference.
    fn reference(x: &Tensor, k: &Tensor, stride: usize, padding: Padding) -> Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let (kh, kw, _, _) = k.dims4()?;
        let (_, ph) = padding.resolve(h, kh, stride)?;
        let (_, pw) = padding.resolve(w, kw, stride)?;
        let xp = x.pad_with_zeros(1, ph.before, ph.after)?.pad_with_zeros(2, pw.before, pw.after)?;
        let y =
            xp.permute((0, 3, 1, 2))?.contiguous()?.conv2d(&k.permute((3, 2, 0, 1))?.contiguous()?, 0, stride, 1, 1)?;
        y.permute((0, 2, 3, 1))
    }

    #[test]
    fn conv_matches_candle_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for (xs, ks, stride, padding) in [
            ([2, 9, 9, 3], [3, 3, 3, 4], 2, Padding::Valid),
            ([1, 8, 7, 5], [3, 3, 5, 6], 1, Padding::Valid),
            ([2, 8, 8, 4], [1, 1, 4, 7], 2, Padding::Same),
            ([1, 7, 7, 4], [1, 1, 4, 7], 2, Padding::Same),
            ([1, 6, 7, 2], [3, 3, 2, 3], 2, Padding::Same),
        ] {
            let x = rand_tensor(&xs, 11, &dev)?;
            let k = rand_tensor(&ks, 12, &dev)?;
            let got = conv2d(&x, &k, stride, padding)?;
            let want = reference(&x, &k, stride, padding)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{xs:?} {ks:?}: max diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = rand_tensor(&[2, 7, 6, 2], 13, &dev)?;
        let k = rand_tensor(&[3, 3, 2, 3], 14, &dev)?;
        numeric_grad_check(&[x.clone(), k], |t| conv2d(&t[0], &t[1], 2, Padding::Same))?;
        let k1 = rand_tensor(&[1, 1, 2, 3], 15, &dev)?;
        numeric_grad_check(&[x, k1], |t| conv2d(&t[0], &t[1], 2, Padding::Valid))?;
        Ok(())
    }
}
