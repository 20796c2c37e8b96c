//! Photos that sit in two splits: the same file (byte for byte) or nearly the same photo (the
//! cosine similarity of the frozen ImageNet base's pooled features, which the feature cache
//! holds anyway, above `near_duplicate`). A validation or test photo that is also a training
//! photo makes the figures read better than the model is; the trainer names each pair in the log
//! and the report, and leaves the choice of what to do to whoever owns the photos.

use crate::data::SPLITS;
use crate::features::FeatureCache;
use models::layers::FEATURES;
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;

/// Most pairs kept (a folder copied into two splits would otherwise list every photo).
pub const MAX_LEAKS: usize = 1000;

/// How two photos are the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakKind {
    /// The same bytes.
    Identical,
    /// Different files, nearly the same photo (similarity of the pooled features).
    Near,
}

/// Two photos of different splits that are the same photo.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Leak {
    pub kind: LeakKind,
    /// The photo of the later split (validation or test).
    pub photo: PathBuf,
    pub split: &'static str,
    /// Its twin in an earlier split (train, or validation for a test photo).
    pub twin: PathBuf,
    pub twin_split: &'static str,
    /// Cosine similarity of their pooled features (1 for identical files).
    pub similarity: f32,
}

/// Unit-length rows of the first `n` items (the originals) of a cache's pooled features.
fn normalised(cache: &FeatureCache) -> Vec<f32> {
    let mut v = cache.pooled[..cache.n * FEATURES].to_vec();
    for row in v.chunks_exact_mut(FEATURES) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// For each row of `a`, the row of `b` most like it and their cosine similarity (rows unit
/// length), computed a block of rows at a time with a matrix product.
fn nearest(a: &[f32], b: &[f32]) -> Vec<(usize, f32)> {
    use candle_core::{Device, Tensor};
    let (na, nb) = (a.len() / FEATURES, b.len() / FEATURES);
    if na == 0 || nb == 0 {
        return Vec::new();
    }
    let run = || -> candle_core::Result<Vec<(usize, f32)>> {
        let bt = Tensor::from_slice(b, (nb, FEATURES), &Device::Cpu)?.t()?;
        let mut out = Vec::with_capacity(na);
        for start in (0..na).step_by(256) {
            let rows = (na - start).min(256);
            let block =
                Tensor::from_slice(&a[start * FEATURES..(start + rows) * FEATURES], (rows, FEATURES), &Device::Cpu)?;
            let sim = block.matmul(&bt)?;
            let best = sim.argmax(1)?.to_vec1::<u32>()?;
            let value = sim.max(1)?.to_vec1::<f32>()?;
            out.extend(best.into_iter().map(|j| j as usize).zip(value));
        }
        Ok(out)
    };
    run().unwrap_or_else(|e| {
        tracing::warn!("near-duplicate search failed: {e}");
        Vec::new()
    })
}

/// The leaks between the splits whose photos are `paths` (cache order) and whose features are
/// `caches`: identical files first, then near-identical photos, most similar first.
pub fn find(paths: &[Vec<PathBuf>; 3], caches: &[FeatureCache; 3], near_duplicate: f64) -> Vec<Leak> {
    use sha2::{Digest, Sha256};
    let mut leaks = Vec::new();
    // Byte for byte: the first photo of each content, by split order.
    let mut first: HashMap<[u8; 32], (usize, usize)> = HashMap::new();
    let mut identical = std::collections::HashSet::new();
    for (s, files) in paths.iter().enumerate() {
        for (i, p) in files.iter().enumerate() {
            // Streamed: a large file is never held whole.
            let mut hasher = Sha256::new();
            let Ok(_) = std::fs::File::open(p).and_then(|mut f| std::io::copy(&mut f, &mut hasher)) else { continue };
            let h: [u8; 32] = hasher.finalize().into();
            match first.get(&h) {
                Some(&(s0, i0)) if s0 != s => {
                    identical.insert((s, i));
                    leaks.push(Leak {
                        kind: LeakKind::Identical,
                        photo: p.clone(),
                        split: SPLITS[s],
                        twin: paths[s0][i0].clone(),
                        twin_split: SPLITS[s0],
                        similarity: 1.0,
                    });
                }
                Some(_) => {}
                None => {
                    first.insert(h, (s, i));
                }
            }
        }
    }
    // Nearly: each validation and test photo against the earlier splits.
    let feats: Vec<Vec<f32>> = caches.iter().map(normalised).collect();
    let mut near = Vec::new();
    for (s, earlier) in [(1usize, 0usize), (2, 0), (2, 1)] {
        for (i, (j, sim)) in nearest(&feats[s], &feats[earlier]).into_iter().enumerate() {
            if f64::from(sim) >= near_duplicate && !identical.contains(&(s, i)) && i < paths[s].len() {
                near.push(Leak {
                    kind: LeakKind::Near,
                    photo: paths[s][i].clone(),
                    split: SPLITS[s],
                    twin: paths[earlier][j].clone(),
                    twin_split: SPLITS[earlier],
                    similarity: sim,
                });
            }
        }
    }
    near.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
    leaks.extend(near);
    leaks.truncate(MAX_LEAKS);
    leaks
}

/// Names the leaks in the log (the report lists them all).
pub fn log(leaks: &[Leak]) {
    if leaks.is_empty() {
        tracing::info!(
            "leaks: no photo of validation or test is also in an earlier split (identical or near-identical)"
        );
        return;
    }
    let identical = leaks.iter().filter(|l| l.kind == LeakKind::Identical).count();
    tracing::warn!(
        "leaks: {identical} photos identical to a photo of an earlier split, {} nearly identical (figures on them \
         are not figures on new photos):",
        leaks.len() - identical
    );
    for l in leaks.iter().take(20) {
        tracing::warn!(
            "  {} {} = {} {} ({})",
            l.split,
            l.photo.display(),
            l.twin_split,
            l.twin.display(),
            match l.kind {
                LeakKind::Identical => "identical bytes".to_string(),
                LeakKind::Near => format!("similarity {:.3}", l.similarity),
            }
        );
    }
    if leaks.len() > 20 {
        tracing::warn!("  ... and {} more in report.html", leaks.len() - 20);
    }
}
