//! The image folder, in the layouts photo sets come in: `train/` with a validation folder
//! (`validation/`, `val/` or `valid/`) and an optional `test/`; `train/` alone; or class folders
//! alone. Each split holds one sub-folder per class (class names from the folders, sorted; a
//! class's images may sit in sub-folders of its own). A split the folder lacks is carved from
//! the photos there are, per class and seeded (see [`carve`]); with a validation folder and no
//! `test/`, there is no test split (the final figure is then validation's, and says so). The
//! assignment goes into the run directory (`modelspec::splits`). Images are listed and decoded
//! with the preprocessing the runtime uses (`modelspec::preprocess`: its one folder walk and its
//! one batch loop) and kept as 8-bit RGB at the input size.

use crate::config::Refit;
use crate::progress::Progress;
use modelspec::preprocess::{decode_batch, files_under, DecodeLimits, Source};
use modelspec::splits::{Origin, Split, SplitRow};
use modelspec::Preprocessing;
use std::path::{Path, PathBuf};

/// The three splits, in the order the trainer uses them.
pub const SPLITS: [&str; 3] = ["train", "validation", "test"];
/// Folder names taken as the validation split (the names Ultralytics, Keras and Hugging Face
/// users give it).
pub const VALIDATION_NAMES: [&str; 3] = ["validation", "val", "valid"];
/// Fewest training photos a class may have.
pub const MIN_TRAIN_PHOTOS: usize = 2;
/// Below this many training photos per class the log warns that figures will be noisy.
pub const FEW_PHOTOS: usize = 20;

/// Why the folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: not a folder of photos the trainer recognises: {reason} (expected train/ with validation/, val/ or \
         valid/ and an optional test/; train/ alone; or one sub-folder of photos per class)"
    )]
    Layout { path: PathBuf, reason: String },
    #[error("{path}: no class folders inside")]
    NoClasses { path: PathBuf },
    #[error("{path}: class `{class}` has no images (JPEG, PNG or WebP)")]
    EmptyClass { path: PathBuf, class: String },
    #[error("{path}: class `{class}` has {found} photos; {reason}")]
    TooFew { path: PathBuf, class: String, found: usize, reason: String },
    #[error("{root}: split `{split}` has classes {found:?}, but train/ has {expected:?}")]
    ClassMismatch { root: PathBuf, split: String, found: Vec<String>, expected: Vec<String> },
    #[error("{path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
}

/// One labelled image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

/// The layout a folder was found in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `train/` and a validation folder (its name), with or without `test/`.
    Splits { validation: String, test: bool },
    /// `train/` alone: validation and test carved from it.
    TrainOnly,
    /// Class folders alone: all three splits carved from them.
    ClassFolders,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layout::Splits { validation, test: true } => write!(f, "train/, {validation}/ and test/"),
            Layout::Splits { validation, test: false } => {
                write!(f, "train/ and {validation}/, no test/ (the final figure is validation's)")
            }
            Layout::TrainOnly => f.write_str("train/ alone (validation and test carved from it)"),
            Layout::ClassFolders => f.write_str("class folders alone (train, validation and test carved from them)"),
        }
    }
}

/// How missing splits are carved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Carve {
    /// Share of each class's photos that goes to a carved validation split.
    pub validation: f64,
    /// Share that goes to a carved test split (0: none).
    pub test: f64,
    pub seed: u64,
}

/// The folder's files, split by split.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The data folder.
    pub root: PathBuf,
    pub layout: Layout,
    pub classes: Vec<String>,
    /// `train`, `validation`, `test`, in that order (`test` empty when the folder has none).
    pub splits: [Vec<Sample>; 3],
    /// Where each split came from.
    pub origins: [Origin; 3],
    /// Files in the class folders that are not images the trainer reads (a GIF, a text file).
    pub ignored: Vec<PathBuf>,
}

/// The folders inside `dir`, sorted (hidden ones left out).
fn sub_dirs(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|source| DataError::Io { path: dir.into(), source })?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    v.sort();
    Ok(v)
}

fn name_of(p: &Path) -> String {
    p.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// One split folder's classes and their image files.
struct SplitDir {
    classes: Vec<String>,
    files: Vec<Vec<PathBuf>>,
}

fn read_split(dir: &Path, ignored: &mut Vec<PathBuf>) -> Result<SplitDir, DataError> {
    let class_dirs = sub_dirs(dir)?;
    if class_dirs.is_empty() {
        return Err(DataError::NoClasses { path: dir.into() });
    }
    let (mut classes, mut files) = (Vec::new(), Vec::new());
    for cdir in class_dirs {
        let l = files_under(&cdir).map_err(|source| DataError::Io { path: cdir.clone(), source })?;
        if l.images.is_empty() {
            return Err(DataError::EmptyClass { path: cdir.clone(), class: name_of(&cdir) });
        }
        ignored.extend(l.others);
        classes.push(name_of(&cdir));
        files.push(l.images);
    }
    Ok(SplitDir { classes, files })
}

/// Which layout `root` is in, with the folder of each split found.
fn detect(root: &Path) -> Result<(Layout, Option<PathBuf>, Option<PathBuf>), DataError> {
    let layout = |reason: String| DataError::Layout { path: root.into(), reason };
    if !root.is_dir() {
        return Err(layout("no such folder".into()));
    }
    let dirs = sub_dirs(root)?;
    let has = |n: &str| dirs.iter().any(|d| name_of(d) == n);
    let vals: Vec<&str> = VALIDATION_NAMES.iter().copied().filter(|n| has(n)).collect();
    if vals.len() > 1 {
        return Err(layout(format!("it has {} validation folders ({}): keep one", vals.len(), vals.join("/, "))));
    }
    if has("train") {
        return Ok(match vals.first() {
            Some(v) => (
                Layout::Splits { validation: v.to_string(), test: has("test") },
                Some(root.join(v)),
                has("test").then(|| root.join("test")),
            ),
            None if has("test") => {
                return Err(layout(
                    "train/ and test/ but no validation folder: add validation/ (or val/), or remove test/ to have \
                     both carved from train/"
                        .into(),
                ))
            }
            None => (Layout::TrainOnly, None, None),
        });
    }
    if let Some(v) = vals.first().copied().or(has("test").then_some("test")) {
        return Err(layout(format!("{v}/ without train/")));
    }
    if dirs.is_empty() {
        let l = files_under(root).map_err(|source| DataError::Io { path: root.into(), source })?;
        return Err(layout(if l.images.is_empty() {
            "no sub-folders and no photos".into()
        } else {
            format!(
                "{} photos but no class folders: put each class's photos in a sub-folder named after it",
                l.images.len()
            )
        }));
    }
    if dirs.len() == 1 {
        return Err(layout(format!("a single class folder ({}/): a classifier needs at least two", name_of(&dirs[0]))));
    }
    Ok((Layout::ClassFolders, None, None))
}

/// A number in [0, 1) drawn from a photo's path (relative to its class folder) and the seed: the
/// order in which [`carve`] takes photos. A hash rather than a shuffle, so that adding photos to
/// a class moves none of the others between splits.
fn rank(seed: u64, rel: &Path) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(rel.to_string_lossy().as_bytes());
    h.finalize().into()
}

/// How many of `n` photos a carved share takes: at least one when the share is not 0.
fn share(n: usize, fraction: f64) -> usize {
    if fraction <= 0.0 {
        0
    } else {
        ((n as f64 * fraction).round() as usize).max(1)
    }
}

/// Carves a class's photos into (train, validation, test): photos ordered by [`rank`], the first
/// `share(validation)` to validation, the next `share(test)` to test, the rest train.
pub fn carve(
    class_dir: &Path,
    files: Vec<PathBuf>,
    fractions: (f64, f64),
    seed: u64,
) -> (Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>) {
    let mut ranked: Vec<([u8; 32], PathBuf)> =
        files.into_iter().map(|f| (rank(seed, f.strip_prefix(class_dir).unwrap_or(&f)), f)).collect();
    ranked.sort();
    let n = ranked.len();
    let (kv, kt) = (share(n, fractions.0), share(n, fractions.1));
    let mut it = ranked.into_iter().map(|(_, f)| f);
    let mut take = |k: usize| {
        let mut v: Vec<PathBuf> = it.by_ref().take(k).collect();
        v.sort();
        v
    };
    let (val, test) = (take(kv), take(kt));
    let train = take(usize::MAX);
    (train, val, test)
}

/// Lists the folder in whichever layout it is, carving the splits it lacks, and checks that
/// every split has the same classes and every class enough photos.
/// The shares of `c` are those `TrainConfig::validate` accepts (validation in (0, 0.5), test in
/// [0, 0.5)).
pub fn scan(root: &Path, c: &Carve) -> Result<Dataset, DataError> {
    let (layout, val_dir, test_dir) = detect(root)?;
    let mut ignored = Vec::new();
    let (carved_from, class_root) = match layout {
        Layout::ClassFolders => (read_split(root, &mut ignored)?, root.to_path_buf()),
        _ => (read_split(&root.join("train"), &mut ignored)?, root.join("train")),
    };
    let classes = carved_from.classes.clone();
    let mut splits: [Vec<Sample>; 3] = Default::default();
    let mut origins = [Origin::Folder; 3];
    let carving = !matches!(layout, Layout::Splits { .. });
    if carving {
        origins = [
            if layout == Layout::ClassFolders { Origin::Carved } else { Origin::Folder },
            Origin::Carved,
            Origin::Carved,
        ];
    }
    for (label, (class, files)) in classes.iter().zip(carved_from.files).enumerate() {
        let cdir = class_root.join(class);
        let n = files.len();
        let (train, val, test) = if carving {
            let (train, val, test) = carve(&cdir, files, (c.validation, c.test), c.seed);
            if train.len() < MIN_TRAIN_PHOTOS {
                return Err(DataError::TooFew {
                    path: cdir,
                    class: class.clone(),
                    found: n,
                    reason: format!(
                        "carving {} for validation and {} for test leaves {} to train on, fewer than {MIN_TRAIN_PHOTOS} \
                         (add photos, or give validation/ and test/ folders)",
                        val.len(),
                        test.len(),
                        train.len()
                    ),
                });
            }
            (train, val, test)
        } else {
            if n < MIN_TRAIN_PHOTOS {
                return Err(DataError::TooFew {
                    path: cdir,
                    class: class.clone(),
                    found: n,
                    reason: format!("at least {MIN_TRAIN_PHOTOS} are needed to train on"),
                });
            }
            (files, Vec::new(), Vec::new())
        };
        for (i, v) in [train, val, test].into_iter().enumerate() {
            splits[i].extend(v.into_iter().map(|path| Sample { path, label }));
        }
    }
    for (i, dir) in [(1, val_dir), (2, test_dir)] {
        let Some(dir) = dir else { continue };
        let sd = read_split(&dir, &mut ignored)?;
        if sd.classes != classes {
            return Err(DataError::ClassMismatch {
                root: root.into(),
                split: name_of(&dir),
                found: sd.classes,
                expected: classes.clone(),
            });
        }
        for (label, files) in sd.files.into_iter().enumerate() {
            splits[i].extend(files.into_iter().map(|path| Sample { path, label }));
        }
    }
    Ok(Dataset { root: root.into(), layout, classes, splits, origins, ignored })
}

impl Dataset {
    /// Photos per class in each split (`counts[split][class]`).
    pub fn counts(&self) -> [Vec<usize>; 3] {
        self.splits.each_ref().map(|s| {
            let mut c = vec![0; self.classes.len()];
            for x in s {
                c[x.label] += 1;
            }
            c
        })
    }

    /// Whether there is a test split (a validation folder without `test/` has none).
    pub fn has_test(&self) -> bool {
        !self.splits[2].is_empty()
    }

    /// The assignment, one row per photo, paths relative to the data folder.
    pub fn rows(&self) -> Vec<SplitRow> {
        let roles = [Split::Train, Split::Validation, Split::Test];
        let mut rows = Vec::new();
        for (i, samples) in self.splits.iter().enumerate() {
            for s in samples {
                rows.push(SplitRow {
                    split: roles[i],
                    class: self.classes[s.label].clone(),
                    path: s.path.strip_prefix(&self.root).unwrap_or(&s.path).to_path_buf(),
                    origin: self.origins[i],
                });
            }
        }
        rows
    }
}

impl Dataset {
    /// Moves validation photos into the training set (see [`Refit`]): all of them, or every
    /// other one of each class in file-name order (the others stay as the validation split).
    pub fn refit(mut self, refit: Refit) -> Self {
        let [train, validation, _] = &mut self.splits;
        match refit {
            Refit::Off => {}
            Refit::All => train.extend(validation.iter().cloned()),
            Refit::Half => {
                let mut seen = vec![0usize; self.classes.len()];
                let mut kept = Vec::new();
                for s in validation.drain(..) {
                    let k = &mut seen[s.label];
                    if k.is_multiple_of(2) {
                        train.push(s);
                    } else {
                        kept.push(s);
                    }
                    *k += 1;
                }
                *validation = kept;
            }
        }
        self
    }
}

/// Photos whose headers [`median_short_side`] reads, at most (spread evenly over the split).
const SIZE_SAMPLE: usize = 400;

/// The median shorter side of the samples' photos, pixels, from the headers of up to
/// [`SIZE_SAMPLE`] of them (nothing is decoded); `None` when none could be read.
pub fn median_short_side(samples: &[Sample]) -> Option<u32> {
    let step = samples.len().div_ceil(SIZE_SAMPLE).max(1);
    let mut sides: Vec<u32> = samples
        .iter()
        .step_by(step)
        .filter_map(|s| {
            let (w, h) = image::ImageReader::open(&s.path).ok()?.with_guessed_format().ok()?.into_dimensions().ok()?;
            Some(w.min(h))
        })
        .collect();
    sides.sort_unstable();
    sides.get(sides.len() / 2).copied()
}

/// Decoded images of one split: 8-bit RGB, `size` x `size`, HWC, one after another.
#[derive(Debug, Clone)]
pub struct Images {
    pub size: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    pub paths: Vec<PathBuf>,
}

impl Images {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i`'s pixels.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.size * self.size * 3;
        &self.pixels[i * n..(i + 1) * n]
    }
}

/// Decodes and resizes the samples in parallel. Unreadable files are returned as `skipped`
/// (path and reason) or, when `strict`, fail the whole load.
pub fn load(
    samples: &[Sample],
    size: usize,
    prep: &Preprocessing,
    strict: bool,
    what: &str,
) -> Result<(Images, Vec<(PathBuf, String)>), DataError> {
    let pb = Progress::new(samples.len(), what);
    let mut images = Images {
        size,
        pixels: Vec::with_capacity(samples.len() * size * size * 3),
        labels: Vec::new(),
        paths: Vec::new(),
    };
    let mut skipped = Vec::new();
    // In chunks, so that the progress bar moves and only one chunk of encoded files is in memory.
    for chunk in samples.chunks(256) {
        let sources: Vec<Source> = chunk.iter().map(|s| Source::File(&s.path)).collect();
        let batch = decode_batch(&sources, size as u32, prep, &DecodeLimits::default());
        if let Some((i, e)) = batch.failed.first().filter(|_| strict) {
            return Err(DataError::Unreadable { path: chunk[*i].path.clone(), reason: e.to_string() });
        }
        skipped.extend(batch.failed.iter().map(|(i, e)| (chunk[*i].path.clone(), e.to_string())));
        images.pixels.extend_from_slice(&batch.pixels);
        for &i in &batch.decoded {
            images.labels.push(chunk[i].label as u32);
            images.paths.push(chunk[i].path.clone());
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish();
    Ok((images, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARVE: Carve = Carve { validation: 0.15, test: 0.15, seed: 42 };

    fn tree(name: &str, layout: &[(&str, &str, &[u8])]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("trainer-data-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (dir, file, bytes) in layout {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            if !file.is_empty() {
                std::fs::write(root.join(dir).join(file), bytes).unwrap();
            }
        }
        root
    }

    /// `n` photos named `p00.png`... in each of `dirs`.
    fn photos(name: &str, dirs: &[&str], n: usize) -> PathBuf {
        let p = png();
        let names: Vec<String> = (0..n).map(|i| format!("p{i:02}.png")).collect();
        let mut layout: Vec<(&str, &str, &[u8])> = Vec::new();
        for d in dirs {
            for f in &names {
                layout.push((d, f, &p));
            }
        }
        tree(name, &layout)
    }

    fn png() -> Vec<u8> {
        let mut v = Vec::new();
        image::RgbImage::from_pixel(4, 3, image::Rgb([200, 10, 10]))
            .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
            .unwrap();
        v
    }

    fn names(v: &[Sample]) -> Vec<String> {
        v.iter().map(|s| s.path.file_name().unwrap().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn scans_and_loads_skipping_corrupt_files() {
        let p = png();
        let mut layout: Vec<(&str, &str, &[u8])> = Vec::new();
        let dirs = ["train/a", "train/b", "validation/a", "validation/b", "test/a", "test/b"];
        for d in dirs {
            layout.push((d, "x.png", &p));
            layout.push((d, "y.png", &p));
        }
        layout.push(("train/a", "broken.jpg", b"not a jpeg"));
        layout.push(("train/a", "imageNotFound.gif", b"GIF89a"));
        let root = tree("ok", &layout);
        let ds = scan(&root, &CARVE).unwrap();
        assert_eq!(ds.layout, Layout::Splits { validation: "validation".into(), test: true });
        assert_eq!(ds.classes, ["a", "b"]);
        assert_eq!(ds.splits[0].len(), 5);
        assert_eq!(ds.origins, [Origin::Folder; 3]);
        // The GIF is not read, and named.
        assert_eq!(ds.ignored, [root.join("train/a/imageNotFound.gif")]);
        let (imgs, skipped) = load(&ds.splits[0], 8, &Preprocessing::default(), false, "t").unwrap();
        assert_eq!((imgs.len(), skipped.len()), (4, 1));
        assert!(skipped[0].0.ends_with("broken.jpg"));
        let e = load(&ds.splits[0], 8, &Preprocessing::default(), true, "t").unwrap_err().to_string();
        assert!(e.contains("broken.jpg"), "{e}");
        std::fs::remove_dir_all(root).unwrap();
    }

    /// The PyTorch tutorial's layout: `val/`, no `test/`; also `valid/`.
    #[test]
    fn a_validation_folder_by_any_of_its_names_and_no_test_split() {
        for v in VALIDATION_NAMES {
            let root = photos(
                &format!("alias-{v}"),
                &["train/ants", "train/bees", &format!("{v}/ants"), &format!("{v}/bees")],
                3,
            );
            let ds = scan(&root, &CARVE).unwrap();
            assert_eq!(ds.layout, Layout::Splits { validation: v.into(), test: false });
            assert_eq!(ds.splits.each_ref().map(|s| s.len()), [6, 6, 0]);
            assert!(!ds.has_test());
            assert!(ds.rows().iter().all(|r| r.origin == Origin::Folder));
            std::fs::remove_dir_all(root).unwrap();
        }
    }

    #[test]
    fn carves_validation_and_test_per_class_seeded_and_stable() {
        // Class folders alone, 20 photos per class: 3 validation, 3 test, 14 train each.
        let root = photos("flat", &["a", "b"], 20);
        let ds = scan(&root, &CARVE).unwrap();
        assert_eq!(ds.layout, Layout::ClassFolders);
        assert_eq!(ds.counts(), [vec![14, 14], vec![3, 3], vec![3, 3]]);
        assert_eq!(ds.origins, [Origin::Carved; 3]);
        // Every photo in exactly one split.
        let mut all: Vec<PathBuf> = ds.splits.iter().flatten().map(|s| s.path.clone()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 40);
        // Same seed, same splits; another seed, others.
        let again = scan(&root, &CARVE).unwrap();
        assert_eq!(again.rows(), ds.rows());
        let other = scan(&root, &Carve { seed: 7, ..CARVE }).unwrap();
        assert_ne!(names(&other.splits[1]), names(&ds.splits[1]));
        // The rows are relative to the data folder.
        assert!(ds.rows().iter().all(|r| r.path.starts_with("a") || r.path.starts_with("b")));
        // Adding a photo moves no other photo between splits (a hash order, not a shuffle), as
        // long as the shares' counts stay the same.
        std::fs::write(root.join("a/p99.png"), png()).unwrap();
        let more = scan(&root, &CARVE).unwrap();
        let moved = |i: usize| names(&ds.splits[i]).iter().filter(|n| !names(&more.splits[i]).contains(n)).count();
        assert!(moved(1) + moved(2) <= 1, "adding one photo moved {} others", moved(1) + moved(2));
        std::fs::remove_dir_all(root).unwrap();

        // train/ alone: validation and test carved from it, train/ stays the origin of the rest.
        let root = photos("train-only", &["train/a", "train/b"], 10);
        let ds = scan(&root, &CARVE).unwrap();
        assert_eq!(ds.layout, Layout::TrainOnly);
        assert_eq!(ds.counts(), [vec![6, 6], vec![2, 2], vec![2, 2]]);
        assert_eq!(ds.origins, [Origin::Folder, Origin::Carved, Origin::Carved]);
        // No test share: none carved.
        let ds = scan(&root, &Carve { test: 0.0, ..CARVE }).unwrap();
        assert_eq!(ds.counts(), [vec![8, 8], vec![2, 2], vec![0, 0]]);
        assert!(!ds.has_test());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn refit_moves_all_or_every_other_validation_photo_per_class() {
        let sample = |name: &str, label| Sample { path: name.into(), label };
        let ds = Dataset {
            root: "/d".into(),
            layout: Layout::Splits { validation: "validation".into(), test: true },
            classes: vec!["a".into(), "b".into()],
            splits: [
                vec![sample("t", 0)],
                vec![sample("a1", 0), sample("a2", 0), sample("a3", 0), sample("b1", 1), sample("b2", 1)],
                vec![sample("x", 1)],
            ],
            origins: [Origin::Folder; 3],
            ignored: vec![],
        };
        let off = ds.clone().refit(Refit::Off);
        assert_eq!((names(&off.splits[0]), names(&off.splits[1])), (names(&ds.splits[0]), names(&ds.splits[1])));
        // Half: the 1st, 3rd, ... of each class train (both classes get their share).
        let half = ds.clone().refit(Refit::Half);
        assert_eq!(names(&half.splits[0]), ["t", "a1", "a3", "b1"]);
        assert_eq!(names(&half.splits[1]), ["a2", "b2"]);
        assert_eq!(half.splits[0][3].label, 1);
        // All: every validation photo trains, and validation still holds them (in-sample).
        let all = ds.clone().refit(Refit::All);
        assert_eq!(names(&all.splits[0]), ["t", "a1", "a2", "a3", "b1", "b2"]);
        assert_eq!(names(&all.splits[1]), names(&ds.splits[1]));
        assert_eq!(names(&all.splits[2]), ["x"]);
    }

    #[test]
    fn structural_problems_are_named() {
        let p = png();
        let err = |layout: &[(&str, &str, &[u8])], name: &str| {
            let root = tree(name, layout);
            let e = scan(&root, &CARVE).unwrap_err().to_string();
            std::fs::remove_dir_all(root).unwrap();
            e
        };
        let e = err(&[("train/a", "x.png", &p), ("train/a", "y.png", &p), ("test/a", "x.png", &p)], "no-val");
        assert!(e.contains("train/ and test/ but no validation folder"), "{e}");
        let e = err(&[("val/a", "x.png", &p), ("test/a", "x.png", &p)], "no-train");
        assert!(e.contains("val/ without train/"), "{e}");
        let e = err(&[("train/a", "x.png", &p), ("val/a", "x.png", &p), ("valid/a", "x.png", &p)], "two-vals");
        assert!(e.contains("2 validation folders"), "{e}");
        let e = err(&[("", "x.png", &p)], "loose");
        assert!(e.contains("1 photos but no class folders"), "{e}");
        let e = err(&[("only", "x.png", &p)], "one-class");
        assert!(e.contains("a single class folder (only/)"), "{e}");
        let e = err(
            &[
                ("train/a", "x.png", &p),
                ("train/a", "y.png", &p),
                ("validation/b", "x.png", &p),
                ("test/a", "x.png", &p),
            ],
            "mismatch",
        );
        assert!(e.contains("split `validation` has classes [\"b\"], but train/ has [\"a\"]"), "{e}");
        let e = err(&[("train/a", "", &[]), ("validation/a", "x.png", &p), ("test/a", "x.png", &p)], "empty");
        assert!(e.contains("class `a` has no images"), "{e}");
        let e = err(
            &[("train/a", "x.png", &p), ("train/b", "x.png", &p), ("val/a", "x.png", &p), ("val/b", "x.png", &p)],
            "one",
        );
        assert!(e.contains("class `a` has 1 photos; at least 2"), "{e}");
        // Too few to carve from: 3 photos give 1 validation, 1 test, 1 train.
        let root = photos("few", &["a", "b"], 3);
        let e = scan(&root, &CARVE).unwrap_err().to_string();
        assert!(e.contains("class `a` has 3 photos") && e.contains("leaves 1 to train on"), "{e}");
        std::fs::remove_dir_all(root).unwrap();
    }
}
