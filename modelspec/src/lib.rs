//! What a model is, in one serde struct: architecture, input size, class names, preprocessing.
//!
//! It is saved as `model.json` beside the weights by the importer and the trainer, copied into
//! the ONNX file's metadata by the exporter, and read back by the runtime — one source of truth
//! for every step of images → trainer → weights → exporter → .onnx → runtime. This crate has no
//! heavy dependencies so that the runtime can use it without linking Candle.

pub mod onnx_meta;
pub mod preprocess;
pub mod splits;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Largest input side a description may give, pixels (Xception runs at 71-299 in practice).
pub const MAX_INPUT_SIZE: usize = 2048;
/// Most classes a description may name.
pub const MAX_CLASSES: usize = 10_000;
/// Longest model or class name, bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Widest hidden layer of a head.
pub const MAX_INNER: usize = 1 << 16;

/// Version of the description format written by this crate.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the description inside a model directory.
pub const DESCRIPTION_FILE: &str = "model.json";
/// File name of the weights inside a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// A unit enum stored as a fixed string in JSON, TOML and ONNX metadata: serde, `as_str`,
/// `Display` and `FromStr` all use the same names, so an unknown value is an error that lists
/// the accepted ones instead of a silent default.
macro_rules! string_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $variant:ident = $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $variant,)+
        }

        impl $name {
            /// Every accepted name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($s),+];

            /// The name stored in files.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s,)+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($name::$variant),)+
                    other => Err(format!("`{other}` is not one of {:?}", Self::NAMES)),
                }
            }
        }
    };
}
pub(crate) use string_enum;

string_enum! {
    /// The base networks a description can name.
    pub enum Architecture {
        /// `keras.applications.Xception` (models::layers).
        Xception = "xception",
    }
}

string_enum! {
    /// Memory layout of the network's input.
    pub enum Layout {
        /// Channels last, [N, H, W, C], as Keras.
        Nhwc = "NHWC",
    }
}

string_enum! {
    /// Colour channels of the input, in order.
    pub enum Color {
        Rgb = "RGB",
    }
}

string_enum! {
    /// Filter used to resize an image to the input size (aspect ratio not kept).
    pub enum Resize {
        /// Bilinear (triangle) filter, as Keras' `image_dataset_from_directory` and PIL.
        Bilinear = "bilinear",
        /// Nearest neighbour.
        Nearest = "nearest",
    }
}

string_enum! {
    /// How a photo is fitted to the square input.
    pub enum Fit {
        /// The whole photo resized to the square, aspect ratio not kept (Keras'
        /// `image_dataset_from_directory`).
        Stretch = "stretch",
        /// The centre square of the photo (its shorter side), then resized: the shape is kept and
        /// the edges of the longer side are cut (torchvision's `Resize` + `CenterCrop`).
        Crop = "crop",
    }
}

impl Default for Fit {
    /// What every file written before this field did.
    fn default() -> Self {
        Fit::Stretch
    }
}

/// How pixels become the network's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Colour channels, in order.
    pub color: Color,
    /// Resize filter used to bring an image to `input_size` x `input_size`.
    pub resize: Resize,
    /// How the photo is fitted to the square before the resize (absent in files written
    /// before it: `stretch`).
    #[serde(default)]
    pub fit: Fit,
    /// `x * scale + offset` on 0-255 pixel values.
    pub scale: f32,
    pub offset: f32,
}

impl Default for Preprocessing {
    /// Xception's: RGB, the whole photo stretched to the square (bilinear), `x / 127.5 - 1`
    /// into [-1, 1].
    fn default() -> Self {
        Self { color: Color::Rgb, resize: Resize::Bilinear, fit: Fit::Stretch, scale: 1.0 / 127.5, offset: -1.0 }
    }
}

/// The classifier head's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// Width of the hidden Dense(relu) layer.
    pub inner: usize,
    /// Dropout rate between the Dense layers (training only).
    pub dropout: f32,
    /// Number of classes.
    pub classes: usize,
}

/// A model: what it is, what it expects, what it answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDescription {
    /// Format version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// A short name for the model.
    pub name: String,
    /// The base network (`xception`).
    pub architecture: Architecture,
    /// Side of the square input image, in pixels.
    pub input_size: usize,
    /// Memory layout of the network's input.
    pub layout: Layout,
    pub preprocessing: Preprocessing,
    /// The classifier head, if any; `None` for a bare feature extractor.
    pub head: Option<Head>,
    /// Class names, in logit order (empty without a head).
    pub classes: Vec<String>,
    /// Where the weights came from (a file, a package, a training run).
    pub source: String,
    /// The labelled image folder a trainer run learnt from (`train/`, `validation/`, `test/`),
    /// where the exporter finds its verification photos; `None` for imported weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<PathBuf>,
    /// Evaluation figures, free-form, filled in by the trainer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
}

/// Why a description could not be read or is inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum DescriptionError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid model description: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("{path}: field `{field}`: {reason}")]
    Invalid { path: PathBuf, field: &'static str, reason: String },
}

impl ModelDescription {
    /// Checks the fields that other steps rely on; `path` only names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<(), DescriptionError> {
        let bad = |field, reason: String| Err(DescriptionError::Invalid { path: path.into(), field, reason });
        if self.format != FORMAT_VERSION {
            return bad("format", format!("version {} is not supported (expected {FORMAT_VERSION})", self.format));
        }
        if self.input_size < 71 {
            return bad("input_size", format!("{} px is below Xception's minimum of 71", self.input_size));
        }
        // Bounds on what a file may ask of a reader: a crafted model.json or ONNX file must not
        // make a runtime allocate for a 100,000 px input or a million classes.
        if self.input_size > MAX_INPUT_SIZE {
            return bad("input_size", format!("{} px is above the {MAX_INPUT_SIZE} px allowed", self.input_size));
        }
        if self.classes.len() > MAX_CLASSES {
            return bad("classes", format!("{} classes is more than the {MAX_CLASSES} allowed", self.classes.len()));
        }
        if let Some(c) = self.classes.iter().find(|c| c.is_empty() || c.len() > MAX_NAME_BYTES) {
            return bad("classes", format!("class name of {} bytes (1 to {MAX_NAME_BYTES} allowed)", c.len()));
        }
        if self.name.len() > MAX_NAME_BYTES {
            return bad("name", format!("{} bytes is longer than the {MAX_NAME_BYTES} allowed", self.name.len()));
        }
        if self.head.is_some_and(|h| h.inner > MAX_INNER) {
            return bad("head", format!("a hidden layer wider than {MAX_INNER}"));
        }
        match &self.head {
            Some(h) if h.classes != self.classes.len() => {
                bad("classes", format!("{} names for a head of {} classes", self.classes.len(), h.classes))
            }
            Some(h) if h.inner == 0 || h.classes == 0 => bad("head", "inner and classes must be positive".into()),
            None if !self.classes.is_empty() => bad("classes", "class names given for a model without a head".into()),
            _ => Ok(()),
        }
    }

    /// Reads and validates `model.json` from a model directory (or the file itself).
    pub fn load(path: &Path) -> Result<Self, DescriptionError> {
        let file = if path.is_dir() { path.join(DESCRIPTION_FILE) } else { path.to_path_buf() };
        let text =
            std::fs::read_to_string(&file).map_err(|source| DescriptionError::Io { path: file.clone(), source })?;
        let d: Self =
            serde_json::from_str(&text).map_err(|source| DescriptionError::Parse { path: file.clone(), source })?;
        d.validate(&file)?;
        Ok(d)
    }

    /// The description as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a description always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ModelDescription {
        ModelDescription {
            format: FORMAT_VERSION,
            name: "footwear".into(),
            architecture: Architecture::Xception,
            input_size: 150,
            layout: Layout::Nhwc,
            preprocessing: Preprocessing::default(),
            head: Some(Head { inner: 100, dropout: 0.2, classes: 3 }),
            classes: vec!["boot".into(), "sandal".into(), "shoe".into()],
            source: "test".into(),
            dataset: None,
            metrics: None,
        }
    }

    #[test]
    fn round_trips_and_validates() {
        let d = sample();
        let back: ModelDescription = serde_json::from_str(&d.to_json()).unwrap();
        assert_eq!(back, d);
        back.validate(Path::new("x")).unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let mut d = sample();
        d.classes.pop();
        let e = d.validate(Path::new("run/model.json")).unwrap_err().to_string();
        assert!(e.contains("run/model.json") && e.contains("`classes`"), "{e}");
        let mut d = sample();
        d.input_size = 32;
        assert!(d.validate(Path::new("m")).unwrap_err().to_string().contains("input_size"));
    }

    /// What a crafted file may ask of a reader is bounded, each bound named.
    #[test]
    fn sizes_are_bounded() {
        let check = |f: &dyn Fn(&mut ModelDescription), field: &str| {
            let mut d = sample();
            f(&mut d);
            let e = d.validate(Path::new("m")).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        };
        check(&|d| d.input_size = 100_000, "input_size");
        check(
            &|d| {
                d.classes = (0..MAX_CLASSES + 1).map(|i| i.to_string()).collect();
                d.head = Some(Head { inner: 10, dropout: 0.0, classes: d.classes.len() });
            },
            "classes",
        );
        check(&|d| d.classes[1] = "x".repeat(MAX_NAME_BYTES + 1), "classes");
        check(&|d| d.classes[1] = String::new(), "classes");
        check(&|d| d.name = "n".repeat(1000), "name");
        check(&|d| d.head = Some(Head { inner: MAX_INNER + 1, dropout: 0.0, classes: 3 }), "head");
    }

    /// The typed fields keep the strings of the files written before them, and an unknown value
    /// is an error that names it instead of a silent default.
    #[test]
    fn typed_fields_read_the_stored_strings_and_refuse_others() {
        let json = sample().to_json();
        for want in
            [r#""architecture": "xception""#, r#""layout": "NHWC""#, r#""resize": "bilinear""#, r#""color": "RGB""#]
        {
            assert!(json.contains(want), "{want} not in {json}");
        }
        let bicubic = json.replace(r#""resize": "bilinear""#, r#""resize": "bicubic""#);
        let e = serde_json::from_str::<ModelDescription>(&bicubic).unwrap_err().to_string();
        assert!(e.contains("bicubic") && e.contains("bilinear"), "{e}");
        assert_eq!("nearest".parse::<Resize>(), Ok(Resize::Nearest));
        assert!("NCHW".parse::<Layout>().unwrap_err().contains("NHWC"));
    }
}
