//! The image folder: `train/`, `validation/`, `test/`, one sub-folder per class (class names
//! from the folders, sorted; a class's images may sit in sub-folders of its own). Images are
//! listed and decoded with the preprocessing the runtime uses (`modelspec::preprocess`: its one
//! folder walk and its one batch loop) and kept as 8-bit RGB at the input size.

use crate::config::Refit;
use crate::progress::Progress;
use modelspec::preprocess::{decode_batch, image_files, DecodeLimits, Source};
use modelspec::Preprocessing;
use std::path::{Path, PathBuf};

/// The three splits, in the order the trainer uses them.
pub const SPLITS: [&str; 3] = ["train", "validation", "test"];

/// Why the folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: split folder is missing (expected train/, validation/ and test/)")]
    MissingSplit { path: PathBuf },
    #[error("{path}: no class folders inside")]
    NoClasses { path: PathBuf },
    #[error("{path}: class `{class}` has no images (JPEG, PNG or WebP)")]
    EmptyClass { path: PathBuf, class: String },
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

/// The folder's files, split by split.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub classes: Vec<String>,
    /// `train`, `validation`, `test`, in that order.
    pub splits: [Vec<Sample>; 3],
}

/// The class folders of a split, sorted (hidden ones left out).
fn class_dirs(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|source| DataError::Io { path: dir.into(), source })?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    v.sort();
    Ok(v)
}

/// Lists the folder, checking that every split has the same non-empty classes.
pub fn scan(root: &Path) -> Result<Dataset, DataError> {
    let mut classes: Option<Vec<String>> = None;
    let mut splits: [Vec<Sample>; 3] = Default::default();
    for (i, split) in SPLITS.iter().enumerate() {
        let dir = root.join(split);
        if !dir.is_dir() {
            return Err(DataError::MissingSplit { path: dir });
        }
        let class_dirs = class_dirs(&dir)?;
        if class_dirs.is_empty() {
            return Err(DataError::NoClasses { path: dir });
        }
        let names: Vec<String> =
            class_dirs.iter().map(|d| d.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
        match &classes {
            None => classes = Some(names.clone()),
            Some(expected) if *expected != names => {
                return Err(DataError::ClassMismatch {
                    root: root.into(),
                    split: split.to_string(),
                    found: names,
                    expected: expected.clone(),
                })
            }
            Some(_) => {}
        }
        for (label, (cdir, name)) in class_dirs.iter().zip(&names).enumerate() {
            let files = image_files(cdir).map_err(|source| DataError::Io { path: cdir.clone(), source })?;
            if files.is_empty() {
                return Err(DataError::EmptyClass { path: cdir.clone(), class: name.clone() });
            }
            splits[i].extend(files.into_iter().map(|path| Sample { path, label }));
        }
    }
    Ok(Dataset { classes: classes.unwrap_or_default(), splits })
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

    fn png() -> Vec<u8> {
        let mut v = Vec::new();
        image::RgbImage::from_pixel(4, 3, image::Rgb([200, 10, 10]))
            .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
            .unwrap();
        v
    }

    #[test]
    fn scans_and_loads_skipping_corrupt_files() {
        let p = png();
        let mut layout: Vec<(&str, &str, &[u8])> = Vec::new();
        let dirs = ["train/a", "train/b", "validation/a", "validation/b", "test/a", "test/b"];
        for d in dirs {
            layout.push((d, "x.png", &p));
        }
        layout.push(("train/a", "broken.jpg", b"not a jpeg"));
        let root = tree("ok", &layout);
        let ds = scan(&root).unwrap();
        assert_eq!(ds.classes, ["a", "b"]);
        assert_eq!(ds.splits[0].len(), 3);
        let (imgs, skipped) = load(&ds.splits[0], 8, &Preprocessing::default(), false, "t").unwrap();
        assert_eq!((imgs.len(), skipped.len()), (2, 1));
        assert!(skipped[0].0.ends_with("broken.jpg"));
        let e = load(&ds.splits[0], 8, &Preprocessing::default(), true, "t").unwrap_err().to_string();
        assert!(e.contains("broken.jpg"), "{e}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn refit_moves_all_or_every_other_validation_photo_per_class() {
        let sample = |name: &str, label| Sample { path: name.into(), label };
        let ds = Dataset {
            classes: vec!["a".into(), "b".into()],
            splits: [
                vec![sample("t", 0)],
                vec![sample("a1", 0), sample("a2", 0), sample("a3", 0), sample("b1", 1), sample("b2", 1)],
                vec![sample("x", 1)],
            ],
        };
        let names = |v: &[Sample]| v.iter().map(|s| s.path.to_string_lossy().into_owned()).collect::<Vec<_>>();
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
        let root = tree("missing", &[("train/a", "x.png", &p), ("validation/a", "x.png", &p)]);
        assert!(scan(&root).unwrap_err().to_string().contains("test"));
        let root2 =
            tree("mismatch", &[("train/a", "x.png", &p), ("validation/b", "x.png", &p), ("test/a", "x.png", &p)]);
        assert!(matches!(scan(&root2).unwrap_err(), DataError::ClassMismatch { .. }));
        let root3 = tree("empty", &[("train/a", "", &[]), ("validation/a", "x.png", &p), ("test/a", "x.png", &p)]);
        let e = scan(&root3).unwrap_err().to_string();
        assert!(e.contains("class `a` has no images"), "{e}");
        for r in [root, root2, root3] {
            std::fs::remove_dir_all(r).unwrap();
        }
    }
}
