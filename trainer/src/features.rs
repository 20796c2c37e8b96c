//! The feature cache. The frozen part of the network is computed once per image (and per
//! augmented variant) and kept in memory: the output of the last frozen block (the input of the
//! blocks fine-tuned in phase 2) and the pooled 2048-d features of the whole base (the input of
//! the head in phase 1). Epochs then cost only the head, or only the unfrozen blocks — not the
//! whole network, as recomputing it every epoch would (about 1 image/s on 2 cores).

use crate::augment::{augment, AugmentConfig};
use crate::data::{progress, Images};
use candle_core::{Device, Result, Tensor};
use models::xception::{global_avg_pool, Xception};
use modelspec::preprocess::to_input;
use modelspec::Preprocessing;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Cached activations of one split. Item `v * n + i` is variant `v` of image `i` (variant 0 is
/// the image itself, the others augmented copies).
#[derive(Debug, Clone)]
pub struct FeatureCache {
    /// Images per variant.
    pub n: usize,
    pub variants: usize,
    /// [h, w, c] of one cached map (output of block `upto`).
    pub map_dims: [usize; 3],
    pub maps: Vec<f32>,
    /// [items, 2048].
    pub pooled: Vec<f32>,
    pub labels: Vec<u32>,
}

impl FeatureCache {
    pub fn items(&self) -> usize {
        self.n * self.variants
    }

    fn map_len(&self) -> usize {
        self.map_dims.iter().product()
    }

    /// The cached maps of `items` as one [B, h, w, c] tensor.
    pub fn maps_batch(&self, items: &[usize], dev: &Device) -> Result<Tensor> {
        let l = self.map_len();
        let mut v = Vec::with_capacity(items.len() * l);
        for &i in items {
            v.extend_from_slice(&self.maps[i * l..(i + 1) * l]);
        }
        let [h, w, c] = self.map_dims;
        Tensor::from_vec(v, (items.len(), h, w, c), dev)
    }

    /// The pooled features of `items` as [B, 2048].
    pub fn pooled_batch(&self, items: &[usize], dev: &Device) -> Result<Tensor> {
        let f = models::layers::FEATURES;
        let mut v = Vec::with_capacity(items.len() * f);
        for &i in items {
            v.extend_from_slice(&self.pooled[i * f..(i + 1) * f]);
        }
        Tensor::from_vec(v, (items.len(), f), dev)
    }

    /// Labels of `items` as a u32 tensor.
    pub fn labels_batch(&self, items: &[usize], dev: &Device) -> Result<Tensor> {
        Tensor::from_vec(items.iter().map(|&i| self.labels[i]).collect::<Vec<_>>(), items.len(), dev)
    }
}

/// What to cache and how.
pub struct CacheSpec<'a> {
    pub variants: usize,
    pub augment: &'a AugmentConfig,
    pub seed: u64,
    /// Distinguishes the splits' augmentation streams.
    pub stream: u64,
    /// Last frozen block: its output is cached.
    pub upto: usize,
    pub batch: usize,
    pub prep: &'a Preprocessing,
    /// Compute type of the frozen blocks (f32 unless `--precision bf16`).
    pub dtype: candle_core::DType,
}

/// The seeded generator of one augmented variant of one image: independent of batching and
/// thread scheduling, so that a cache is the same on every run with the same seed.
pub fn variant_rng(seed: u64, stream: u64, image: usize, variant: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.set_stream(((image as u64) << 16) | variant as u64);
    rng
}

/// The network input of one item, [size, size, 3] floats.
pub fn item_input(images: &Images, image: usize, variant: usize, spec: &CacheSpec) -> Vec<f32> {
    let size = images.size;
    if variant == 0 || !spec.augment.enabled {
        let img =
            image::RgbImage::from_raw(size as u32, size as u32, images.image(image).to_vec()).expect("image size");
        return to_input(&img, spec.prep);
    }
    let mut rng = variant_rng(spec.seed, spec.stream, image, variant);
    let px = augment(images.image(image), size, spec.augment, &mut rng);
    to_input(&image::RgbImage::from_raw(size as u32, size as u32, px).expect("image size"), spec.prep)
}

/// The key of a cache on disk: everything its contents depend on.
pub fn disk_key(images: &Images, spec: &CacheSpec, base_weights: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    // File contents, not modification times: a copied or re-materialised data folder (same
    // photos, new mtimes) still finds its cache. Reading 6,000 small photos takes well under a second.
    let mut digest = |p: &std::path::Path| {
        h.update(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        match std::fs::read(p) {
            Ok(bytes) => h.update(Sha256::digest(&bytes)),
            Err(_) => h.update(b"unreadable"),
        }
    };
    for p in &images.paths {
        digest(p);
    }
    digest(base_weights);
    h.update(format!(
        "{}|{}|{}|{}|{}|{}|{:?}|{:?}",
        images.size,
        spec.variants,
        spec.seed,
        spec.stream,
        spec.upto,
        images.len(),
        spec.augment,
        spec.prep
    ));
    // (f32 caches keep the key they had before the precision option existed.)
    if spec.dtype != candle_core::DType::F32 {
        h.update(format!("|{:?}", spec.dtype));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Header of a cache saved on disk (beside two raw little-endian f32 files).
#[derive(serde::Serialize, serde::Deserialize)]
struct DiskHeader {
    n: usize,
    variants: usize,
    map_dims: [usize; 3],
    labels: Vec<u32>,
}

fn read_f32(path: &std::path::Path, len: usize) -> std::io::Result<Vec<f32>> {
    use std::io::Read;
    let mut v = vec![0f32; len];
    let mut f = std::fs::File::open(path)?;
    f.read_exact(bytemuck::cast_slice_mut(&mut v))?;
    Ok(v)
}

/// Loads a cache saved by [`save`] under `dir/key`, if present and complete.
pub fn load(dir: &std::path::Path, key: &str) -> Option<FeatureCache> {
    let header: DiskHeader = serde_json::from_slice(&std::fs::read(dir.join(format!("{key}.json"))).ok()?).ok()?;
    let items = header.n * header.variants;
    let maps =
        read_f32(&dir.join(format!("{key}.maps.f32")), items * header.map_dims.iter().product::<usize>()).ok()?;
    let pooled = read_f32(&dir.join(format!("{key}.pooled.f32")), items * models::layers::FEATURES).ok()?;
    Some(FeatureCache {
        n: header.n,
        variants: header.variants,
        map_dims: header.map_dims,
        maps,
        pooled,
        labels: header.labels,
    })
}

/// Saves a cache under `dir/key`: data files first, the header last, each written to a
/// temporary name and renamed, so a killed run never leaves a cache that looks complete.
pub fn save(dir: &std::path::Path, key: &str, c: &FeatureCache) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let write = |name: String, bytes: &[u8]| -> std::io::Result<()> {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(tmp, dir.join(name))
    };
    write(format!("{key}.maps.f32"), bytemuck::cast_slice(&c.maps))?;
    write(format!("{key}.pooled.f32"), bytemuck::cast_slice(&c.pooled))?;
    let header = DiskHeader { n: c.n, variants: c.variants, map_dims: c.map_dims, labels: c.labels.clone() };
    write(format!("{key}.json"), &serde_json::to_vec(&header).expect("header serialises"))
}

/// Runs the frozen blocks over every item of `images` and caches their outputs.
pub fn build(base: &Xception, images: &Images, spec: &CacheSpec, what: &str, dev: &Device) -> Result<FeatureCache> {
    let (n, size) = (images.len(), images.size);
    let items = n * spec.variants;
    let pb = progress(items, what);
    let mut maps = Vec::new();
    let mut pooled = Vec::with_capacity(items * models::layers::FEATURES);
    let mut map_dims = [0; 3];
    let mut start = 0;
    while start < items {
        let end = (start + spec.batch).min(items);
        let mut input = Vec::with_capacity((end - start) * size * size * 3);
        for item in start..end {
            input.extend(item_input(images, item % n, item / n, spec));
        }
        let x = Tensor::from_vec(input, (end - start, size, size, 3), dev)?;
        let m = base.forward_blocks(&x, 1, spec.upto, &mut |_, _| {})?;
        let top = if spec.upto < models::layers::NUM_BLOCKS {
            base.forward_blocks(&m, spec.upto + 1, models::layers::NUM_BLOCKS, &mut |_, _| {})?
        } else {
            m.clone()
        };
        let (_, h, w, c) = m.dims4()?;
        map_dims = [h, w, c];
        if maps.capacity() == 0 {
            maps.reserve_exact(items * h * w * c);
        }
        maps.extend(m.flatten_all()?.to_vec1::<f32>()?);
        pooled.extend(global_avg_pool(&top)?.flatten_all()?.to_vec1::<f32>()?);
        pb.inc((end - start) as u64);
        start = end;
    }
    pb.finish_and_clear();
    let labels = (0..items).map(|i| images.labels[i % n]).collect();
    Ok(FeatureCache { n, variants: spec.variants, map_dims, maps, pooled, labels })
}
