//! The feature cache. The frozen part of the network is computed once per image (and per
//! augmented variant): the output of the last frozen block (the input of the blocks fine-tuned
//! in phase 2) and the pooled 2048-d features of the whole base (the input of the head in
//! phase 1). Epochs then cost only the head, or only the unfrozen blocks.
//!
//! It scales to tens of thousands of images: maps are stored as float16 (half the bytes; the
//! rounding, 2^-11 relative, is far below what the fine-tuned blocks can tell) and, with a cache
//! folder, streamed to a file while they are computed and read back batch by batch, so resident
//! memory does not grow with the data (the OS page cache keeps the file warm). Pooled features
//! are kept apart from the maps and keyed without the block, so a run that only changes epochs,
//! rates or the blocks fine-tuned reuses them. The frozen blocks run on the fastest engine at
//! hand ([`Engine`]): ONNX Runtime when its library is found and its features match the Candle
//! network's within [`ENGINE_TOLERANCE`], else Candle.

use crate::augment::{augment, AugmentConfig};
use crate::progress::Progress;
use anyhow::Context;
use candle_core::{Device, Result, Tensor};
use half::f16;
use models::xception::{global_avg_pool, Xception};
use modelspec::preprocess::to_input;
use modelspec::Preprocessing;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::data::Images;

/// Largest difference accepted between ONNX Runtime's and Candle's frozen features, relative to
/// the largest magnitude of the Candle features (checked on the first batch of every cache).
/// Measured: 1e-6 to 3e-6 (the two engines sum in different orders).
pub const ENGINE_TOLERANCE: f32 = 1e-4;

/// Where the cached maps live.
#[derive(Debug, Clone)]
enum MapStore {
    /// No maps (phase 2 off: only pooled features are needed).
    None,
    Memory(Arc<Vec<f16>>),
    /// A file of `items * map_len` little-endian float16, read item by item.
    File(Arc<std::fs::File>, PathBuf),
}

/// Cached activations of one split. Item `v * n + i` is variant `v` of image `i` (variant 0 is
/// the image itself, the others augmented copies).
#[derive(Debug, Clone)]
pub struct FeatureCache {
    /// Images per variant.
    pub n: usize,
    pub variants: usize,
    /// [h, w, c] of one cached map (output of block `upto`); zeros without maps.
    pub map_dims: [usize; 3],
    maps: MapStore,
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

    /// Whether block maps are cached (phase 2 needs them).
    pub fn has_maps(&self) -> bool {
        !matches!(self.maps, MapStore::None)
    }

    /// The cached maps of `items` as one f32 [B, h, w, c] tensor.
    pub fn maps_batch(&self, items: &[usize], dev: &Device) -> Result<Tensor> {
        use half::slice::HalfFloatSliceExt;
        let l = self.map_len();
        let mut half = vec![f16::ZERO; items.len() * l];
        for (k, &i) in items.iter().enumerate() {
            let dst = &mut half[k * l..(k + 1) * l];
            match &self.maps {
                MapStore::None => candle_core::bail!("this feature cache holds no block maps"),
                MapStore::Memory(v) => dst.copy_from_slice(&v[i * l..(i + 1) * l]),
                MapStore::File(f, path) => f
                    .read_exact_at(bytemuck::cast_slice_mut(dst), (i * l * 2) as u64)
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?,
            }
        }
        let mut v = vec![0f32; half.len()];
        half.convert_to_f32_slice(&mut v);
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
    /// Last frozen block: its output is cached (when `maps`).
    pub upto: usize,
    /// Whether block maps are cached at all (phase 2 on).
    pub maps: bool,
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

/// The engine that runs the frozen blocks.
pub enum Engine<'a> {
    /// The Candle network (any device and precision).
    Candle(&'a Xception),
    /// ONNX Runtime on the CPU (f32), checked against the Candle network on each cache's first
    /// batch.
    OnnxRuntime { session: Box<inference::session::FloatSession>, upto: usize, check: &'a Xception },
}

impl Engine<'_> {
    /// Part of the cache key: caches of different engines differ in the last bits.
    pub fn name(&self) -> String {
        match self {
            Engine::Candle(_) => "candle".into(),
            Engine::OnnxRuntime { .. } => format!("onnxruntime {}", inference::ortlib::ORT_VERSION),
        }
    }

    /// The maps of block `upto` and the pooled features of `x` ([B, size, size, 3]).
    fn run(&mut self, x: Vec<f32>, size: usize, upto: usize, dev: &Device) -> anyhow::Result<(Tensor, Vec<f32>)> {
        let b = x.len() / (size * size * 3);
        match self {
            Engine::Candle(base) => {
                let x = Tensor::from_vec(x, (b, size, size, 3), dev)?;
                candle_forward(base, &x, upto)
            }
            Engine::OnnxRuntime { session, upto: graph_upto, .. } => {
                anyhow::ensure!(*graph_upto == upto, "the ONNX graph taps block {graph_upto}, not {upto}");
                let mut out =
                    session.run(x, &[b, size, size, 3], &[onnxgraph::MAP_NAME, modelspec::onnx_meta::FEATURES_NAME])?;
                let (pooled_shape, pooled) = out.pop().expect("two outputs");
                let (map_shape, map) = out.pop().expect("two outputs");
                anyhow::ensure!(
                    map_shape.len() == 4 && pooled_shape == [b, models::layers::FEATURES],
                    "ONNX Runtime gave shapes {map_shape:?} and {pooled_shape:?}"
                );
                Ok((Tensor::from_vec(map, map_shape, dev)?, pooled))
            }
        }
    }

    /// With ONNX Runtime: the largest difference from the Candle network on the first items of
    /// `x`, relative to the Candle features' largest magnitude (maps and pooled features).
    pub fn check(&mut self, x: &[f32], size: usize, upto: usize, dev: &Device) -> anyhow::Result<Option<f32>> {
        let Engine::OnnxRuntime { check, .. } = self else { return Ok(None) };
        let check: &Xception = check;
        let per = size * size * 3;
        let k = (x.len() / per).min(2);
        let sample = x[..k * per].to_vec();
        let (cm, cp) = candle_forward(check, &Tensor::from_vec(sample.clone(), (k, size, size, 3), dev)?, upto)?;
        let (om, op) = self.run(sample, size, upto, dev)?;
        let rel = |a: &[f32], b: &[f32]| {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
        };
        let cm = cm.flatten_all()?.to_vec1::<f32>()?;
        let om = om.flatten_all()?.to_vec1::<f32>()?;
        anyhow::ensure!(cm.len() == om.len(), "ONNX Runtime's maps have {} values, Candle's {}", om.len(), cm.len());
        Ok(Some(rel(&cm, &om).max(rel(&cp, &op))))
    }
}

fn candle_forward(base: &Xception, x: &Tensor, upto: usize) -> anyhow::Result<(Tensor, Vec<f32>)> {
    let m = base.forward_blocks(x, 1, upto, &mut |_, _| {})?;
    let top = if upto < models::layers::NUM_BLOCKS {
        base.forward_blocks(&m, upto + 1, models::layers::NUM_BLOCKS, &mut |_, _| {})?
    } else {
        m.clone()
    };
    let pooled = global_avg_pool(&top)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((m.to_dtype(candle_core::DType::F32)?, pooled))
}

/// The keys of a cache on disk: (pooled features, block maps). The first covers everything the
/// pooled features depend on; the second adds the block whose output is cached.
pub fn disk_keys(images: &Images, spec: &CacheSpec, base_weights: &Path, engine: &str) -> (String, String) {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    // File contents, not modification times: a copied or re-materialised data folder (same
    // photos, new mtimes) still finds its cache. Reading 13,200 small photos takes about a second.
    let mut digest = |p: &Path| {
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
    // The seed, stream and augmentation draw the augmented variants only: a cache of the
    // originals alone (validation, test, or augmentation off) is shared by every seed. (The
    // augmented caches keep the key format of before, so that they stay valid.)
    let (size, n, variants, prep, dtype) = (images.size, images.len(), spec.variants, prep_key(spec.prep), spec.dtype);
    h.update(if variants > 1 && spec.augment.enabled {
        let (seed, stream, augment) = (spec.seed, spec.stream, spec.augment);
        format!("v2|{size}|{variants}|{seed}|{stream}|{n}|{augment:?}|{prep}|{dtype:?}|{engine}")
    } else {
        format!("v2|{size}|{variants}|originals|{n}|{prep}|{dtype:?}|{engine}")
    });
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let pooled = h.finalize();
    let maps = Sha256::digest(format!("{}|maps f16 upto {}", hex(&pooled), spec.upto));
    (hex(&pooled), hex(&maps))
}

/// The preprocessing's part of a cache key: what `{:?}` printed before the photo's fit was a
/// setting (so that the caches of stretched photos keep their keys), and the fit after it
/// otherwise.
fn prep_key(p: &Preprocessing) -> String {
    let old = format!(
        "Preprocessing {{ color: {:?}, resize: {:?}, scale: {:?}, offset: {:?} }}",
        p.color, p.resize, p.scale, p.offset
    );
    match p.fit {
        modelspec::Fit::Stretch => old,
        fit => format!("{old}|fit {fit}"),
    }
}

/// Header of the pooled features saved on disk (beside a raw little-endian f32 file).
#[derive(serde::Serialize, serde::Deserialize)]
struct PooledHeader {
    n: usize,
    variants: usize,
    labels: Vec<u32>,
}

/// Header of the maps saved on disk (beside a raw little-endian f16 file).
#[derive(serde::Serialize, serde::Deserialize)]
struct MapsHeader {
    items: usize,
    map_dims: [usize; 3],
}

fn read_f32(path: &Path, len: usize) -> std::io::Result<Vec<f32>> {
    use std::io::Read;
    let mut v = vec![0f32; len];
    let mut f = std::fs::File::open(path)?;
    f.read_exact(bytemuck::cast_slice_mut(&mut v))?;
    Ok(v)
}

/// Writes `path` through a temporary file beside it; an error names the file.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    s.into()
}

/// The cache saved under `dir` with these keys, if present and complete: pooled features
/// always, maps when `maps`.
pub fn load(dir: &Path, (pooled_key, maps_key): &(String, String), maps: bool) -> Option<FeatureCache> {
    let header: PooledHeader =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{pooled_key}.json"))).ok()?).ok()?;
    let items = header.n * header.variants;
    let pooled = read_f32(&dir.join(format!("{pooled_key}.pooled.f32")), items * models::layers::FEATURES).ok()?;
    let (store, map_dims) = if maps {
        let mh: MapsHeader =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{maps_key}.maps.json"))).ok()?).ok()?;
        let path = dir.join(format!("{maps_key}.maps.f16"));
        let f = std::fs::File::open(&path).ok()?;
        let want = (mh.items * mh.map_dims.iter().product::<usize>() * 2) as u64;
        if mh.items != items || f.metadata().ok()?.len() != want {
            return None;
        }
        (MapStore::File(Arc::new(f), path), mh.map_dims)
    } else {
        (MapStore::None, [0; 3])
    };
    Some(FeatureCache { n: header.n, variants: header.variants, map_dims, maps: store, pooled, labels: header.labels })
}

/// Where the maps being computed go.
enum MapSink {
    None,
    Memory(Vec<f16>),
    File { file: std::io::BufWriter<std::fs::File>, tmp: PathBuf, path: PathBuf },
}

/// Runs the frozen blocks over every item of `images` and caches their outputs. With `dir`, the
/// maps are streamed to `dir/<maps key>.maps.f16` as they come (memory stays flat) and the
/// pooled features saved beside them; each file is written under a temporary name and renamed,
/// headers last, so a killed run never leaves a cache that looks complete.
pub fn build(
    engine: &mut Engine,
    images: &Images,
    spec: &CacheSpec,
    dir: Option<(&Path, &(String, String))>,
    what: &str,
    dev: &Device,
) -> anyhow::Result<FeatureCache> {
    use half::slice::HalfFloatSliceExt;
    let (n, size) = (images.len(), images.size);
    let items = n * spec.variants;
    // Before any work: pooled features are written there even when no maps are (phase 2 off).
    if let Some((d, _)) = dir {
        std::fs::create_dir_all(d).with_context(|| format!("feature cache folder {}", d.display()))?;
    }
    let mut sink = match (spec.maps, dir) {
        (false, _) => MapSink::None,
        (true, None) => MapSink::Memory(Vec::new()),
        (true, Some((d, (_, key)))) => {
            let path = d.join(format!("{key}.maps.f16"));
            let tmp = tmp_path(&path);
            let created = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let file = std::io::BufWriter::with_capacity(1 << 22, created);
            MapSink::File { file, tmp, path }
        }
    };
    let pb = Progress::new(items, what);
    let mut pooled = Vec::with_capacity(items * models::layers::FEATURES);
    let mut map_dims = [0; 3];
    let mut start = 0;
    while start < items {
        let end = (start + spec.batch).min(items);
        let mut input = Vec::with_capacity((end - start) * size * size * 3);
        for item in start..end {
            input.extend(item_input(images, item % n, item / n, spec));
        }
        if start == 0 {
            if let Some(d) = engine.check(&input, size, spec.upto, dev)? {
                tracing::info!("{what}: ONNX Runtime's features within {d:.1e} of Candle's (relative)");
                anyhow::ensure!(
                    d <= ENGINE_TOLERANCE,
                    "ONNX Runtime's frozen features differ from Candle's by {d:.1e} (relative), over {ENGINE_TOLERANCE:.0e}"
                );
            }
        }
        let (m, p) = engine.run(input, size, spec.upto, dev)?;
        let (_, h, w, c) = m.dims4()?;
        map_dims = [h, w, c];
        pooled.extend(p);
        if !matches!(sink, MapSink::None) {
            let v = m.flatten_all()?.to_vec1::<f32>()?;
            let mut half = vec![f16::ZERO; v.len()];
            half.convert_from_f32_slice(&v);
            match &mut sink {
                MapSink::None => {}
                MapSink::Memory(all) => {
                    if all.capacity() == 0 {
                        all.reserve_exact(items * h * w * c);
                    }
                    all.extend_from_slice(&half);
                }
                MapSink::File { file, .. } => std::io::Write::write_all(file, bytemuck::cast_slice(&half))?,
            }
        }
        pb.inc((end - start) as u64);
        start = end;
    }
    pb.finish();
    let labels: Vec<u32> = (0..items).map(|i| images.labels[i % n]).collect();
    let maps = match sink {
        MapSink::None => MapStore::None,
        MapSink::Memory(v) => MapStore::Memory(Arc::new(v)),
        MapSink::File { file, tmp, path } => {
            let f =
                file.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", tmp.display()))?;
            f.sync_all().with_context(|| format!("writing {}", tmp.display()))?;
            drop(f);
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
            let (d, (_, key)) = dir.expect("a file sink has a folder");
            write_atomic(&d.join(format!("{key}.maps.json")), &serde_json::to_vec(&MapsHeader { items, map_dims })?)?;
            MapStore::File(Arc::new(std::fs::File::open(&path)?), path)
        }
    };
    if let Some((d, (key, _))) = dir {
        write_atomic(&d.join(format!("{key}.pooled.f32")), bytemuck::cast_slice(&pooled))?;
        let header = PooledHeader { n, variants: spec.variants, labels: labels.clone() };
        write_atomic(&d.join(format!("{key}.json")), &serde_json::to_vec(&header)?)?;
    }
    if !spec.maps {
        map_dims = [0; 3];
    }
    Ok(FeatureCache { n, variants: spec.variants, map_dims, maps, pooled, labels })
}
