//! Fast CPU kernels for the parts of Xception that Candle does slowly or not at all.
//!
//! Every kernel works on channels-last (NHWC) data, the layout the whole model uses: channels are
//! the innermost, contiguous axis, so each kernel's inner loop is a plain vectorisable loop over
//! channels. Each op is a Candle `CustomOp` with a forward and a backward, so that autograd works
//! through them when blocks are fine-tuned; each is tested against a naive reference
//! implementation and its gradients are checked numerically.
//!
//! The kernels are for f32 tensors on the CPU. For any other device (CUDA) or float type (bf16)
//! each public function here takes [`portable`], the same layer written with Candle's own ops.

pub mod depthwise;
pub mod fused;
pub mod im2col;
pub mod linear;
pub mod maxpool;
pub mod portable;
#[cfg(test)]
pub(crate) mod testing;

use candle_core::{CpuStorage, Layout, Result};

/// How a window-sliding op pads its input, with TensorFlow's conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// No padding; windows that would cross the border are dropped.
    Valid,
    /// Output size `ceil(in / stride)`; the padding needed is split with the smaller half
    /// before and the larger after (TensorFlow's asymmetric 'same').
    Same,
}

/// Explicit padding of one spatial axis: elements added before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AxisPad {
    pub before: usize,
    pub after: usize,
}

impl Padding {
    /// Output length and padding of one axis of `len` elements for a window `k`, stride `s`;
    /// `None` when a 'valid' window does not fit.
    pub fn window(self, len: usize, k: usize, s: usize) -> Option<(usize, AxisPad)> {
        match self {
            Padding::Valid => (len >= k).then(|| ((len - k) / s + 1, AxisPad { before: 0, after: 0 })),
            Padding::Same => {
                let out = len.div_ceil(s);
                let total = ((out.max(1) - 1) * s + k).saturating_sub(len);
                Some((out, AxisPad { before: total / 2, after: total - total / 2 }))
            }
        }
    }

    /// [`Padding::window`], or an error naming the sizes.
    pub fn resolve(self, len: usize, k: usize, s: usize) -> Result<(usize, AxisPad)> {
        match self.window(len, k, s) {
            Some(w) => Ok(w),
            None => candle_core::bail!("input of {len} px is smaller than the {k} px window"),
        }
    }

    /// Output length of one axis (0 when the window does not fit).
    pub fn output_size(self, len: usize, k: usize, s: usize) -> usize {
        self.window(len, k, s).map_or(0, |(out, _)| out)
    }
}

/// Sizes of a sliding-window op on NHWC data: input N, H, W, C and output OH, OW.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub oh: usize,
    pub ow: usize,
}

/// The geometry of a `kh`x`kw` window with `stride` and explicit padding over the NHWC `l`.
pub(crate) fn window_geom(
    l: &Layout,
    (kh, kw): (usize, usize),
    stride: usize,
    pad_h: AxisPad,
    pad_w: AxisPad,
    op: &str,
) -> Result<Geom> {
    let (n, h, w, c) = nhwc(l, op)?;
    let (ph, pw) = (h + pad_h.before + pad_h.after, w + pad_w.before + pad_w.after);
    if ph < kh || pw < kw || stride == 0 {
        candle_core::bail!("{op}: {h}x{w} input is smaller than the {kh}x{kw} window (or stride 0)")
    }
    Ok(Geom { n, h, w, c, oh: (ph - kh) / stride + 1, ow: (pw - kw) / stride + 1 })
}

/// The f32 contents of a contiguous CPU tensor, or an error naming the op.
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("{op}: only f32 tensors are supported"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The four dimensions of an NHWC tensor, or an error naming the op.
pub(crate) fn nhwc(l: &Layout, op: &str) -> Result<(usize, usize, usize, usize)> {
    match l.dims() {
        &[n, h, w, c] => Ok((n, h, w, c)),
        d => candle_core::bail!("{op}: expected an NHWC tensor of rank 4, got shape {d:?}"),
    }
}

/// `acc += a * b` over equally long slices, written so that the compiler vectorises it.
#[inline(always)]
pub(crate) fn axpy(acc: &mut [f32], a: &[f32], b: &[f32]) {
    let n = acc.len().min(a.len()).min(b.len());
    let (acc, a, b) = (&mut acc[..n], &a[..n], &b[..n]);
    for i in 0..n {
        acc[i] += a[i] * b[i];
    }
}

/// Defines a function whose body is compiled twice, for AVX2 and for the baseline target, and
/// picks one at run time: binaries stay portable (no `target-cpu=native`), hot loops get 8-wide
/// vectors. Everything the body calls must be `#[inline(always)]` to benefit.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) { imp($($arg),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were detected on this processor just above.
                    return unsafe { wide($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        // The two cases the issue names: a 3x3 stride-2 pool on 147 px and on 72 px.
        assert_eq!(Padding::Same.resolve(147, 3, 2).unwrap(), (74, AxisPad { before: 1, after: 1 }));
        assert_eq!(Padding::Same.resolve(72, 3, 2).unwrap(), (36, AxisPad { before: 0, after: 1 }));
        assert_eq!(Padding::Same.resolve(9, 3, 1).unwrap(), (9, AxisPad { before: 1, after: 1 }));
        assert_eq!(Padding::Same.resolve(72, 1, 2).unwrap(), (36, AxisPad { before: 0, after: 0 }));
        assert_eq!(Padding::Valid.resolve(150, 3, 2).unwrap(), (74, AxisPad { before: 0, after: 0 }));
        assert!(Padding::Valid.resolve(2, 3, 1).is_err());
    }
}
