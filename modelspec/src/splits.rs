//! Which photo of a training run's folder was in which split: the trainer writes it into the run
//! directory (`splits.csv`) whatever the folder's layout (splits given as folders, or carved from
//! the photos there were), and the exporter (calibration and verification photos) and
//! `trainer eval` read it back, so that no step has to guess what was trained on and what was
//! held out.
//!
//! One row per photo: `split,class,path,origin`, the path relative to the data folder (the
//! description's `dataset`), `origin` saying whether the split was a folder of the data
//! (`folder`) or carved by the trainer (`carved`).

use crate::string_enum;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the assignment inside a run directory.
pub const SPLITS_FILE: &str = "splits.csv";

string_enum! {
    /// The role of a photo in a run.
    pub enum Split {
        /// Trained on.
        Train = "train",
        /// Chose the epochs and the settings (early stopping, best epoch).
        Validation = "validation",
        /// Held out for the final figure.
        Test = "test",
    }
}

string_enum! {
    /// Where a photo's split came from.
    pub enum Origin {
        /// A split folder of the data (`train/`, `val/`, ...).
        Folder = "folder",
        /// Carved by the trainer from the photos of another split (seeded, per class).
        Carved = "carved",
    }
}

/// One photo of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitRow {
    pub split: Split,
    pub class: String,
    /// Relative to the data folder.
    pub path: PathBuf,
    pub origin: Origin,
}

/// Why an assignment could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SplitsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}, line {line}: {reason}")]
    Parse { path: PathBuf, line: usize, reason: String },
}

/// Writes the rows as CSV (through a temporary file, renamed).
pub fn write(path: &Path, rows: &[SplitRow]) -> Result<(), SplitsError> {
    let io = |source| SplitsError::Io { path: path.into(), source };
    let tmp = path.with_extension("csv.tmp");
    let mut w = csv::Writer::from_path(&tmp).map_err(|e| io(e.into()))?;
    for r in rows {
        w.serialize(r).map_err(|e| io(e.into()))?;
    }
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads a file [`write`] wrote.
pub fn read(path: &Path) -> Result<Vec<SplitRow>, SplitsError> {
    let mut r = csv::Reader::from_path(path).map_err(|e| SplitsError::Io { path: path.into(), source: e.into() })?;
    r.deserialize()
        .map(|row| {
            row.map_err(|e| SplitsError::Parse {
                path: path.into(),
                line: e.position().map_or(0, |p| p.line() as usize),
                reason: match e.kind() {
                    csv::ErrorKind::Deserialize { err, .. } => err.to_string(),
                    _ => e.to_string(),
                },
            })
        })
        .collect()
}

/// The photos of `split` in the run directory's assignment, as (absolute path, label) with the
/// labels of `classes`: `Ok(None)` for a run written before assignments were (the data folder's
/// `train/` and `test/` are its splits then).
pub fn photos_of(
    run_dir: &Path,
    dataset: &Path,
    classes: &[String],
    split: Split,
) -> Result<Option<Vec<(PathBuf, usize)>>, SplitsError> {
    let path = run_dir.join(SPLITS_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (i, r) in read(&path)?.into_iter().enumerate() {
        if r.split != split {
            continue;
        }
        let Some(label) = classes.iter().position(|c| *c == r.class) else {
            return Err(SplitsError::Parse {
                path,
                line: i + 2,
                reason: format!("class `{}` is not one of the model's {classes:?}", r.class),
            });
        };
        out.push((dataset.join(&r.path), label));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_awkward_names_and_names_bad_lines() {
        let dir = std::env::temp_dir().join(format!("modelspec-splits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(SPLITS_FILE);
        let rows = vec![
            SplitRow { split: Split::Train, class: "a".into(), path: "train/a/x.jpg".into(), origin: Origin::Folder },
            SplitRow {
                split: Split::Validation,
                class: "b, \"the\" class".into(),
                path: "b, \"the\" class/y,1.jpg".into(),
                origin: Origin::Carved,
            },
        ];
        write(&path, &rows).unwrap();
        assert_eq!(read(&path).unwrap(), rows);
        let classes = vec!["a".to_string(), "b, \"the\" class".to_string()];
        let v = photos_of(&dir, Path::new("/data"), &classes, Split::Validation).unwrap().unwrap();
        assert_eq!(v, vec![(PathBuf::from("/data/b, \"the\" class/y,1.jpg"), 1)]);
        assert!(photos_of(&dir, Path::new("/d"), &classes, Split::Test).unwrap().unwrap().is_empty());
        let e = photos_of(&dir, Path::new("/d"), &classes[..1], Split::Validation).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("not one of"), "{e}");
        std::fs::write(&path, "split,class,path,origin\ntrain,a,x.jpg,folder\nholdout,a,y.jpg,folder\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("holdout"), "{e}");
        std::fs::write(&path, "path\nx.jpg\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("split"), "{e}");
        // A run without an assignment: the caller falls back to the folder's splits.
        assert!(photos_of(&dir.join("none"), Path::new("/d"), &classes, Split::Test).unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
