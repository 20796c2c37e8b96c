//! `y = x·W + b` (optionally followed by relu) as one op over [M, K] x [K, N]: the bias is
//! written into the output before the matrix product accumulates onto it, so no extra pass over
//! the activations is made. This is every pointwise convolution of Xception (on the [N·H·W, C]
//! view of NHWC data) with its folded batch-norm.

use super::contiguous_f32;
use super::fused::{mask_positive, sum_rows};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x` `[M, K]` · `w` `[K, N]` + `b` `[N]`, then relu if asked.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    if !super::portable::use_kernels(x) {
        return super::portable::linear(x, w, b, relu);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Linear { relu })
}

/// The op; see [`linear`].
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    pub relu: bool,
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear_bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (x, w, b) = (contiguous_f32(s1, l1, op)?, contiguous_f32(s2, l2, op)?, contiguous_f32(s3, l3, op)?);
        let (m, k, n) = match (l1.dims(), l2.dims(), l3.dims()) {
            (&[m, k], &[k2, n], &[n2]) if k == k2 && n == n2 => (m, k, n),
            (a, b, c) => candle_core::bail!("{op}: shapes {a:?} x {b:?} + {c:?} do not fit [M, K] x [K, N] + [N]"),
        };
        // The bias, row after row (in parallel: this first touch of the buffer maps its pages);
        // the product then accumulates onto it.
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        if n > 0 {
            out.spare_capacity_mut()[..m * n].par_chunks_mut(n * 16).for_each(|rows| {
                rows.chunks_mut(n).for_each(|r| {
                    r.iter_mut().zip(b).for_each(|(o, b)| {
                        o.write(*b);
                    })
                })
            });
        }
        // SAFETY: every one of the m rows of n elements was written just above.
        unsafe { out.set_len(m * n) };
        let threads = candle_core::utils::get_num_threads();
        let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        if m > 0 && n > 0 && k > 0 {
            // SAFETY: the three buffers are contiguous row-major matrices of the sizes checked
            // above, and `out` does not alias the inputs.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    true,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        }
        if self.relu {
            out.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = if self.relu { mask_positive(grad, res)? } else { grad.clone() };
        let gx = g.matmul(&w.t()?)?;
        let gw = x.t()?.matmul(&g)?;
        let gb = sum_rows(&g)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{numeric_grad_check, rand_tensor};
    use candle_core::Device;

    #[test]
    fn matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 3, 2), (37, 64, 19), (200, 33, 128)] {
            let (x, w, b) =
                (rand_tensor(&[m, k], 1, &dev)?, rand_tensor(&[k, n], 2, &dev)?, rand_tensor(&[n], 3, &dev)?);
            let want = x.matmul(&w)?.broadcast_add(&b)?;
            for relu in [false, true] {
                let want = if relu { want.relu()? } else { want.clone() };
                let d = (linear(&x, &w, &b, relu)? - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(d < 1e-5, "{m}x{k}x{n} relu={relu}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (x, w, b) = (rand_tensor(&[5, 4], 4, &dev)?, rand_tensor(&[4, 3], 5, &dev)?, rand_tensor(&[3], 6, &dev)?);
        numeric_grad_check(&[x.clone(), w.clone(), b.clone()], |t| linear(&t[0], &t[1], &t[2], false))?;
        // For relu, keep every pre-activation far from the kink: small x·W, bias ±1.5.
        let b = Tensor::new(&[1.5f32, -1.5, 1.5], &dev)?;
        numeric_grad_check(&[(x * 0.1)?, (w * 0.1)?, b], |t| linear(&t[0], &t[1], &t[2], true))?;
        Ok(())
    }
}
