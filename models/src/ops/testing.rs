//! Helpers for the kernels' tests: seeded inputs and a numerical gradient check.

use candle_core::{Device, Result, Tensor, Var};

/// A tensor of the given shape filled with seeded uniform values in [-1, 1).
pub fn rand_tensor(shape: &[usize], seed: u64, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, dev)
}

/// Checks autograd's gradients of `sum(f(inputs) * r)` (r a fixed random weighting) against
/// central finite differences, element by element, for every input.
pub fn numeric_grad_check(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<()> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts)?;
    let r = rand_tensor(out.dims(), 99, out.device())?;
    let loss = |ts: &[Tensor]| -> Result<f64> { Ok(f(ts)?.mul(&r)?.sum_all()?.to_scalar::<f32>()? as f64) };
    let grads = out.mul(&r)?.sum_all()?.backward()?;
    let eps = 1e-2f32;
    for (i, v) in vars.iter().enumerate() {
        let g = grads.get(v.as_tensor()).expect("no gradient for an input").flatten_all()?.to_vec1::<f32>()?;
        let base = inputs[i].flatten_all()?.to_vec1::<f32>()?;
        for j in 0..base.len() {
            let probe = |d: f32| -> Result<f64> {
                let mut p = base.clone();
                p[j] += d;
                let mut ts: Vec<Tensor> = inputs.to_vec();
                ts[i] = Tensor::from_vec(p, inputs[i].dims(), inputs[i].device())?;
                loss(&ts)
            };
            let numeric = (probe(eps)? - probe(-eps)?) / (2.0 * eps as f64);
            let err = (numeric - g[j] as f64).abs();
            if err > 2e-3 * (1.0 + numeric.abs()) {
                candle_core::bail!("input {i} element {j}: autograd {} vs numeric {numeric}", g[j])
            }
        }
    }
    Ok(())
}
