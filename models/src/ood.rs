//! How unlike the training photos an image is: the class-conditional Mahalanobis distance (Lee et
//! al., 2018) of its pooled features, **L2-normalised first** (Mahalanobis++, Mueller & Hein,
//! 2025), with one covariance shared by the classes and shrunk towards a multiple of the identity
//! by the Ledoit-Wolf rule (so that a folder of a few hundred photos, fewer than the 2,048
//! features, still gives a well-conditioned estimate).
//!
//! Why normalised: the pooled features' length varies a lot from photo to photo (contrast,
//! how much of the frame the object fills), and the shared covariance learns that variance along
//! the class means; an image whose features are small everywhere (a flat colour, noise, a page
//! of text) then lies close to every class mean and scores *lower* than real photos. On unit
//! vectors only the direction counts (docs/ood.md has the figures of both).
//!
//! The score of features `x`, with `u = x / |x|`, is `min over classes c of |(u - mean_c) L^-T|^2
//! / D`, with `S = L L^T` the shrunk covariance of the normalised training features and `D` the
//! number of features: about 1 for a typical training photo, larger the further an image lies
//! from every class. It is stored as the whitening `P = L^-T` and the whitened class means
//! `mean_c P`, so that the score is a normalisation, one matrix product, a subtraction and two
//! reductions: the ONNX graph computes it (`onnxgraph`) and [`Ood::scores`] is the reference it
//! is checked against.
//!
//! `ood.safetensors` in a model directory holds [`PROJECTION`] [D, D] and [`CENTRES`] [K, D];
//! `ood.json` says how it was fitted ([`OodFit`]).

use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use std::collections::HashMap;
use std::path::Path;

/// The tensors' file in a model directory.
pub const OOD_FILE: &str = "ood.safetensors";
/// How the fit was made, beside it.
pub const OOD_INFO: &str = "ood.json";
/// The whitening `P` [D, D] (row-major: whitened = features · P).
pub const PROJECTION: &str = "ood.projection";
/// The whitened class means [K, D].
pub const CENTRES: &str = "ood.centres";
/// The score's name in the metadata and the docs (Mahalanobis on L2-normalised features). Fits
/// of the first version, `mahalanobis` (of the raw features), are refused by the exporter: `trainer
/// ood RUN` refits them.
pub const METHOD: &str = "mahalanobis_l2";

/// Added to the squared length before its square root (the graph does the same): a vector of
/// zeros stays zeros instead of dividing by zero.
pub const NORM_EPS: f64 = 1e-12;

/// `x / sqrt(|x|^2 + NORM_EPS)`, in f64.
pub fn unit(x: &[f32]) -> Vec<f64> {
    let n = (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() + NORM_EPS).sqrt();
    x.iter().map(|&v| v as f64 / n).collect()
}

/// The fitted score.
#[derive(Debug, Clone)]
pub struct Ood {
    pub dim: usize,
    pub classes: usize,
    /// [dim · dim], row-major.
    pub projection: Vec<f32>,
    /// [classes · dim], row-major.
    pub centres: Vec<f32>,
}

/// How a fit was made (`ood.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OodFit {
    pub method: String,
    /// Photos of each class it was fitted on (the training split's originals).
    pub photos: Vec<usize>,
    /// The Ledoit-Wolf shrinkage of the covariance towards `trace/D · I` (0: none, 1: all).
    pub shrinkage: f64,
    /// Features.
    pub dim: usize,
}

impl Ood {
    /// Fits on `features` ([n · dim], row-major) of photos of classes `labels` (< `classes`).
    pub fn fit(features: &[f32], labels: &[u32], dim: usize, classes: usize) -> Result<(Self, OodFit)> {
        let n = labels.len();
        let bad = |m: String| ModelError::format(Path::new(OOD_FILE), m);
        if features.len() != n * dim {
            return Err(bad(format!("{} features for {n} photos of {dim}", features.len())));
        }
        let mut counts = vec![0usize; classes];
        for &l in labels {
            *counts.get_mut(l as usize).ok_or_else(|| bad(format!("label {l} of {classes} classes")))? += 1;
        }
        if let Some(c) = counts.iter().position(|&c| c < 2) {
            return Err(bad(format!("class {c} has {} photos: at least 2 are needed", counts[c])));
        }
        // The normalised features, their class means, then the features centred on their
        // class's mean (in f64).
        let features: Vec<f64> = features.chunks_exact(dim).flat_map(unit).collect();
        let mut means = vec![0f64; classes * dim];
        for (row, &l) in features.chunks_exact(dim).zip(labels) {
            for (m, &x) in means[l as usize * dim..][..dim].iter_mut().zip(row) {
                *m += x;
            }
        }
        for (c, &k) in counts.iter().enumerate() {
            means[c * dim..][..dim].iter_mut().for_each(|m| *m /= k as f64);
        }
        let mut centred = vec![0f64; n * dim];
        for ((out, row), &l) in centred.chunks_exact_mut(dim).zip(features.chunks_exact(dim)).zip(labels) {
            for ((o, &x), m) in out.iter_mut().zip(row).zip(&means[l as usize * dim..][..dim]) {
                *o = x - m;
            }
        }
        let (cov, shrinkage) = ledoit_wolf(&centred, n, dim)?;
        let chol =
            nalgebra::Cholesky::new(cov).ok_or_else(|| bad("the shrunk covariance is not positive definite".into()))?;
        // P = L^-T: |x P|^2 = x L^-T L^-1 x^T = x S^-1 x^T.
        let l_inv =
            chol.l().solve_lower_triangular(&DMatrix::identity(dim, dim)).ok_or_else(|| bad("singular".into()))?;
        let p = l_inv.transpose();
        let projection: Vec<f32> =
            (0..dim).flat_map(|i| (0..dim).map(move |j| (i, j))).map(|(i, j)| p[(i, j)] as f32).collect();
        let mut centres = vec![0f32; classes * dim];
        for c in 0..classes {
            let m = &means[c * dim..][..dim];
            for j in 0..dim {
                centres[c * dim + j] = (0..dim).map(|i| m[i] * p[(i, j)]).sum::<f64>() as f32;
            }
        }
        let fit = OodFit { method: METHOD.into(), photos: counts, shrinkage, dim };
        Ok((Self { dim, classes, projection, centres }, fit))
    }

    /// The score of each row of `features` ([n · dim]), computed as the graph does, in f64.
    pub fn scores(&self, features: &[f32]) -> Vec<f32> {
        let d = self.dim;
        features
            .chunks_exact(d)
            .map(|x| {
                let mut z = vec![0f64; d];
                for (i, xi) in unit(x).into_iter().enumerate() {
                    for (zj, &p) in z.iter_mut().zip(&self.projection[i * d..][..d]) {
                        *zj += xi * p as f64;
                    }
                }
                let best = self
                    .centres
                    .chunks_exact(d)
                    .map(|c| z.iter().zip(c).map(|(a, &b)| (a - b as f64).powi(2)).sum::<f64>())
                    .fold(f64::INFINITY, f64::min);
                (best / d as f64) as f32
            })
            .collect()
    }

    /// The tensors to save, by name.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let (d, k) = (self.dim, self.classes);
        Ok(HashMap::from([
            (PROJECTION.to_string(), Tensor::from_vec(self.projection.clone(), (d, d), &Device::Cpu)?),
            (CENTRES.to_string(), Tensor::from_vec(self.centres.clone(), (k, d), &Device::Cpu)?),
        ]))
    }

    /// Writes `ood.safetensors` and `ood.json` into `dir`, each atomically.
    pub fn save(&self, dir: &Path, fit: &OodFit) -> Result<()> {
        let tmp = dir.join(format!(".{OOD_FILE}.tmp"));
        candle_core::safetensors::save(&self.tensors()?, &tmp)?;
        std::fs::rename(&tmp, dir.join(OOD_FILE)).map_err(ModelError::io(dir.join(OOD_FILE)))?;
        let tmp = dir.join(format!(".{OOD_INFO}.tmp"));
        let json = serde_json::to_string_pretty(fit).map_err(|e| ModelError::format(&tmp, e.to_string()))?;
        std::fs::write(&tmp, json).map_err(ModelError::io(&tmp))?;
        std::fs::rename(&tmp, dir.join(OOD_INFO)).map_err(ModelError::io(dir.join(OOD_INFO)))?;
        Ok(())
    }

    /// The fit of a model directory, `None` when it has none; checked against `dim` features and
    /// `classes` classes.
    pub fn load(dir: &Path, dim: usize, classes: usize) -> Result<Option<(Self, OodFit)>> {
        let path = dir.join(OOD_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let bad = |m: String| ModelError::format(&path, m);
        let t = candle_core::safetensors::load(&path, &Device::Cpu)?;
        let get = |name: &str, shape: [usize; 2]| -> Result<Vec<f32>> {
            let x = t.get(name).ok_or_else(|| bad(format!("no tensor {name}")))?;
            if x.dims() != shape || x.dtype() != DType::F32 {
                return Err(bad(format!("{name}: {:?} {:?}, expected F32 {shape:?}", x.dtype(), x.dims())));
            }
            let v = x.flatten_all()?.to_vec1::<f32>()?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("{name}: values that are not finite")));
            }
            Ok(v)
        };
        let projection = get(PROJECTION, [dim, dim])?;
        let centres = get(CENTRES, [classes, dim])?;
        let info_path = dir.join(OOD_INFO);
        let info = std::fs::read_to_string(&info_path).map_err(ModelError::io(&info_path))?;
        let fit: OodFit = serde_json::from_str(&info).map_err(|e| ModelError::format(&info_path, e.to_string()))?;
        Ok(Some((Self { dim, classes, projection, centres }, fit)))
    }
}

/// The p-quantile of `v` (linear interpolation, as numpy's default).
pub fn quantile(v: &[f32], p: f64) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(f32::total_cmp);
    if s.is_empty() {
        return f32::NAN;
    }
    let pos = p.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let t = (pos - lo as f64) as f32;
    s[lo] * (1.0 - t) + s[hi] * t
}

/// The Ledoit-Wolf shrunk covariance of the rows of `x` ([n · p], already centred) and its
/// shrinkage, as scikit-learn's `ledoit_wolf` computes them.
fn ledoit_wolf(x: &[f64], n: usize, p: usize) -> Result<(DMatrix<f64>, f64)> {
    let dev = Device::Cpu;
    let xt = Tensor::from_slice(x, (n, p), &dev)?;
    let xx = xt.t()?.matmul(&xt)?; // X^T X
    let x2 = xt.sqr()?;
    let beta_ = x2.t()?.matmul(&x2)?.sum_all()?.to_scalar::<f64>()?;
    let delta_ = xx.sqr()?.sum_all()?.to_scalar::<f64>()? / (n * n) as f64;
    let cov = (xx / n as f64)?;
    let trace = x.iter().map(|v| v * v).sum::<f64>() / n as f64;
    let mu = trace / p as f64;
    let beta = (beta_ / n as f64 - delta_) / (p * n) as f64;
    let delta = (delta_ - 2.0 * mu * trace + p as f64 * mu * mu) / p as f64;
    let shrinkage = if delta <= 0.0 { 1.0 } else { beta.min(delta).max(0.0) / delta };
    let v = cov.flatten_all()?.to_vec1::<f64>()?;
    let mut s = DMatrix::from_row_slice(p, p, &v) * (1.0 - shrinkage);
    for i in 0..p {
        s[(i, i)] += shrinkage * mu;
    }
    Ok((s, shrinkage))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes in 6 dimensions, around (10, 0, ...) and (0, 10, 0, ...): the score of a point
    /// is the squared Mahalanobis distance of its direction to the nearer mean direction over D,
    /// computed directly with the inverse covariance of the normalised features.
    #[test]
    fn scores_are_the_mahalanobis_distance_to_the_nearest_class() {
        let (d, n) = (6, 400);
        // A fixed pseudo-random sequence in [0, 1) (a linear congruential generator).
        let mut state = 7u64;
        let mut uniform = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut f = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let c = (i % 2) as u32;
            for j in 0..d {
                let spread = 1.0 + j as f32;
                let centre = if j == c as usize { 10.0 } else { 0.0 };
                f.push(centre + spread * (uniform() - 0.5));
            }
            labels.push(c);
        }
        let (ood, fit) = Ood::fit(&f, &labels, d, 2).unwrap();
        assert_eq!(fit.photos, vec![200, 200]);
        assert!((0.0..=1.0).contains(&fit.shrinkage));
        // The same covariance of the unit vectors, shrunk, inverted directly.
        let norm = |r: &[f32]| r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        let mut means = vec![vec![0f64; d]; 2];
        for (r, &l) in f.chunks(d).zip(&labels) {
            for j in 0..d {
                means[l as usize][j] += r[j] as f64 / norm(r) / 200.0;
            }
        }
        let mut s = DMatrix::<f64>::zeros(d, d);
        for (r, &l) in f.chunks(d).zip(&labels) {
            let v = DMatrix::from_iterator(d, 1, (0..d).map(|j| r[j] as f64 / norm(r) - means[l as usize][j]));
            s += &v * v.transpose() / n as f64;
        }
        let mu = s.trace() / d as f64;
        let s = s * (1.0 - fit.shrinkage) + DMatrix::identity(d, d) * (fit.shrinkage * mu);
        let inv = s.try_inverse().unwrap();
        let probes = [vec![1.0f32; 6], vec![10.0, 0.5, 0.0, 0.0, 0.0, 0.0], vec![2.5, 0.0, 9.0, -3.0, 1.0, 20.0]];
        for x in probes {
            let got = ood.scores(&x)[0] as f64;
            let want = means
                .iter()
                .map(|m| {
                    let v = DMatrix::from_iterator(d, 1, (0..d).map(|j| x[j] as f64 / norm(&x) - m[j]));
                    (v.transpose() * &inv * &v)[(0, 0)]
                })
                .fold(f64::INFINITY, f64::min)
                / d as f64;
            assert!((got - want).abs() <= 1e-4 * want.max(1.0), "{got} vs {want}");
        }
        // A point in another direction scores far higher than the training points' typical 1,
        // however long or short it is; the length of a training direction does not matter.
        let train: Vec<f32> = ood.scores(&f);
        let mean = train.iter().sum::<f32>() / n as f32;
        assert!(mean < 1.5, "{mean}");
        for len in [0.01f32, 1.0, 100.0] {
            assert!(ood.scores(&[0.0, 0.0, 0.0, 0.0, 0.0, len])[0] > 10.0 * mean, "length {len}");
        }
        let a = ood.scores(&[10.0, 0.3, 0.0, 0.0, 0.0, 0.0])[0];
        let b = ood.scores(&[0.1, 0.003, 0.0, 0.0, 0.0, 0.0])[0];
        assert!(a < 1.5 * mean && (a - b).abs() <= 1e-5 * a, "{a} vs {b}");
        // Zeros (a black image's features after a ReLU) stay finite.
        assert!(ood.scores(&[0.0; 6])[0].is_finite());
    }

    #[test]
    fn save_and_load_round_trip_and_checks_shapes() {
        let dir = std::env::temp_dir().join(format!("ood-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f: Vec<f32> = (0..40).map(|i| ((i * 7919) % 13) as f32).collect();
        let labels: Vec<u32> = (0..10).map(|i| i % 2).collect();
        let (ood, fit) = Ood::fit(&f, &labels, 4, 2).unwrap();
        ood.save(&dir, &fit).unwrap();
        let (back, fit2) = Ood::load(&dir, 4, 2).unwrap().unwrap();
        assert_eq!(back.projection, ood.projection);
        assert_eq!(fit2.photos, fit.photos);
        let err = Ood::load(&dir, 4, 3).unwrap_err().to_string();
        assert!(err.contains(OOD_FILE) && err.contains(CENTRES), "{err}");
        assert!(Ood::load(&dir.join("none"), 4, 2).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
