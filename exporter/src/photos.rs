//! Where the exporter finds labelled photos of the run it exports: the run directory's
//! `splits.csv` (written by the trainer whatever the data folder's layout, carved splits
//! included), else, for runs written before it, the data folder's `train/` and `test/`. Without
//! a test split (a folder with `val/` and no `test/`) the held-out photos are validation's, and
//! the reports say so.

use anyhow::Context;
use modelspec::preprocess::image_files;
use modelspec::splits::{photos_of, Split};
use modelspec::ModelDescription;
use std::path::{Path, PathBuf};

/// Labelled photos (path, label) and a phrase naming where they came from.
pub type Labelled = (Vec<(PathBuf, usize)>, String);

/// The photos of `split` of the run in `run_dir`, `None` when neither the run nor its data
/// folder has that split.
pub fn split_photos(run_dir: &Path, desc: &ModelDescription, split: Split) -> anyhow::Result<Option<Labelled>> {
    let Some(root) = desc.dataset.as_ref() else { return Ok(None) };
    let listed = photos_of(run_dir, root, &desc.classes, split)?;
    if let Some(files) = listed {
        let file = run_dir.join(modelspec::splits::SPLITS_FILE);
        return Ok((!files.is_empty()).then(|| (files, format!("the {split} split of {}", file.display()))));
    }
    let dir = root.join(split.as_str());
    if !dir.is_dir() {
        return Ok(None);
    }
    Ok(Some((labelled(&dir, &desc.classes)?, dir.display().to_string())))
}

/// The photos the run held out: its test split, else its validation split (said in the phrase).
pub fn held_out(run_dir: &Path, desc: &ModelDescription) -> anyhow::Result<Option<Labelled>> {
    if let Some(t) = split_photos(run_dir, desc, Split::Test)? {
        return Ok(Some(t));
    }
    Ok(split_photos(run_dir, desc, Split::Validation)?
        .map(|(f, what)| (f, format!("{what} (the run has no test split)"))))
}

/// The labelled image files of `folder/<class>/`.
pub fn labelled(folder: &Path, classes: &[String]) -> anyhow::Result<Vec<(PathBuf, usize)>> {
    let mut out = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = folder.join(class);
        let files = image_files(&dir).with_context(|| format!("listing {}", dir.display()))?;
        out.extend(files.into_iter().map(|f| (f, label)));
    }
    if out.is_empty() {
        anyhow::bail!("{}: no photos in the class folders {classes:?}", folder.display());
    }
    Ok(out)
}

/// Up to `per_class` of each class's photos, in the order given.
pub fn per_class(files: &[(PathBuf, usize)], classes: usize, per_class: usize) -> Vec<PathBuf> {
    let mut taken = vec![0usize; classes];
    files
        .iter()
        .filter(|(_, l)| {
            let ok = taken.get(*l).is_some_and(|&n| n < per_class);
            if ok {
                taken[*l] += 1;
            }
            ok
        })
        .map(|(f, _)| f.clone())
        .collect()
}
