//! What the tests of every crate share: where the repository, `../shared` and the converted
//! weights are, scratch folders, small subsets of the footwear photos, tensor comparisons,
//! hand-built PNG files ([`png`]) and an allocator that bounds a test binary ([`alloc`]).
//! A dev-dependency only; nothing here ships.

pub mod alloc;
pub mod png;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `../shared` beside the repository ($SHARED_DIR overrides): data, fixtures.
pub fn shared() -> PathBuf {
    std::env::var_os("SHARED_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("../shared"))
}

/// `../shared/fixtures`, computed with TensorFlow 2.21 / Keras 3.15 (see its README).
pub fn fixtures() -> PathBuf {
    shared().join("fixtures")
}

/// The 6,000 labelled footwear photos (`train/`, `validation/`, `test/`).
pub fn footwear() -> PathBuf {
    shared().join("data/footwear")
}

/// A converted model directory of `scripts/fetch-weights.sh` (`xception-imagenet`,
/// `kitchenware`; $WEIGHTS_DIR overrides `weights/`), or a panic saying how to get it.
pub fn weights(name: &str) -> PathBuf {
    let dir = std::env::var_os("WEIGHTS_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("weights"));
    let p = dir.join(name);
    assert!(p.join("model.safetensors").exists(), "{} is missing: run scripts/fetch-weights.sh first", p.display());
    p
}

/// An empty scratch folder `<tmp>/<prefix>-<pid>-<name>`.
pub fn tmp(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    d
}

/// A small image folder: symbolic links to the first `per_class` photos (sorted by name) of
/// every class and split of `src`, created under `dst`.
pub fn link_subset(src: &Path, dst: &Path, per_class: usize) -> std::io::Result<()> {
    for split in ["train", "validation", "test"] {
        let mut classes: Vec<_> = std::fs::read_dir(src.join(split))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        classes.sort();
        for from in classes {
            let to = dst.join(split).join(from.file_name().expect("a folder name"));
            std::fs::create_dir_all(&to)?;
            let mut files: Vec<_> = std::fs::read_dir(&from)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            for f in files.into_iter().take(per_class) {
                let link = to.join(f.file_name().expect("a file name"));
                if !link.exists() {
                    std::os::unix::fs::symlink(std::fs::canonicalize(&f)?, link)?;
                }
            }
        }
    }
    Ok(())
}

/// [`link_subset`] of the footwear photos in a fresh scratch folder.
pub fn small_footwear(prefix: &str, per_class: usize) -> PathBuf {
    let dst = tmp(prefix, &format!("footwear-{per_class}"));
    link_subset(&footwear(), &dst, per_class).expect("linking a subset of ../shared/data/footwear");
    dst
}

/// The first `n` test photos of each class of an image folder, with their class.
pub fn test_photos(data: &Path, n: usize) -> Vec<(PathBuf, String)> {
    let mut classes: Vec<PathBuf> =
        std::fs::read_dir(data.join("test")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    classes.sort();
    let mut out = Vec::new();
    for class in classes {
        let name = class.file_name().unwrap().to_string_lossy().into_owned();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&class).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        out.extend(files.into_iter().take(n).map(|f| (f, name.clone())));
    }
    out
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
