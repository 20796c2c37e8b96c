//! The metadata properties of an exported ONNX file: what the exporter writes and the runtime
//! reads, so that `model.onnx` travels alone. Each property is a plain string, JSON where it is
//! structured, readable by any ONNX tool (`onnx.load(f).metadata_props`, onnxruntime's
//! `get_modelmeta().custom_metadata_map`).
//!
//! By default the graph itself scales pixels: its input is the decoded, resized RGB image as
//! `uint8` [N, size, size, 3], so a runtime only decodes and resizes. A `float32` variant takes
//! the scaled pixels instead (what generic float-only tools feed).

use crate::{string_enum, Head, ModelDescription, Preprocessing, FORMAT_VERSION};
use serde::{Deserialize, Serialize};

/// JSON list of class names, in output order.
pub const CLASSES: &str = "classes";
/// Side of the square input, pixels (a decimal number).
pub const INPUT_SIZE: &str = "input_size";
/// Input memory layout (`NHWC`).
pub const LAYOUT: &str = "layout";
/// Input element type: `uint8` (resized pixels, scaled inside the graph) or `float32` (pixels
/// already scaled by `x * scale + offset`, for tools that only feed float tensors).
pub const INPUT_TYPE: &str = "input_type";
/// JSON [`OnnxPreprocessing`]: how an image becomes the input tensor.
pub const PREPROCESSING: &str = "preprocessing";
pub const MODEL_NAME: &str = "model_name";
pub const MODEL_VERSION: &str = "model_version";
pub const ARCHITECTURE: &str = "architecture";
/// JSON object of training metrics (test accuracy, macro-F1, ...), `null` if unknown.
pub const METRICS: &str = "metrics";
/// Where the weights came from (the trainer's run, a Keras file).
pub const SOURCE: &str = "source";
/// Name and version of the tool that wrote the file.
pub const TOOLCHAIN: &str = "toolchain";
/// JSON of the classifier head's sizes, `null` for a bare feature extractor.
pub const HEAD: &str = "head";
/// [`Precision`] of the weights and arithmetic (`float32` when absent: files written before it).
pub const PRECISION: &str = "precision";
/// JSON of an int8 file's calibration (method, photos, seed), absent otherwise.
pub const CALIBRATION: &str = "calibration";
/// [`FLIP`] when the graph averages each image with its mirror image (outputs: the means of
/// the two), absent otherwise.
pub const TEST_TIME_AUGMENTATION: &str = "test_time_augmentation";
/// The value of [`TEST_TIME_AUGMENTATION`] for flip averaging.
pub const FLIP: &str = "flip";
/// JSON [`OodMeta`]: the graph's [`OOD_SCORE_NAME`] output, its threshold and how it was set;
/// absent in files without the output.
pub const OOD: &str = "ood";

/// Names of the graph's input and outputs.
pub const INPUT_NAME: &str = "image";
pub const LOGITS_NAME: &str = "logits";
pub const PROBABILITIES_NAME: &str = "probabilities";
pub const FEATURES_NAME: &str = "features";
/// float32 [N]: how unlike the training photos each image is (larger: further); an image whose
/// score is above [`OodMeta::threshold`] is out of distribution.
pub const OOD_SCORE_NAME: &str = "ood_score";

/// The out-of-distribution score of a file ([`OOD`]): what the graph's [`OOD_SCORE_NAME`]
/// computes and the threshold above which a runtime answers `unknown`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OodMeta {
    /// The score (`mahalanobis_l2`: the class-conditional Mahalanobis distance of the pooled
    /// features' direction, shared covariance, divided by the number of features; files of the
    /// first version say `mahalanobis`, of the raw features).
    pub method: String,
    /// Images scoring above it are out of distribution.
    pub threshold: f32,
    /// The share of in-distribution photos the threshold was set to reject (0.01: 1%).
    pub rejection_rate: f64,
    /// How it was set: the photos (in distribution only) and the file whose scores set it.
    pub set_on: String,
    /// Photos scored to set it.
    pub photos: usize,
    /// The share of them rejected at the threshold (the set rate, up to rounding).
    pub rejected: f64,
    /// Photos of each class the score was fitted on (the training split).
    #[serde(default)]
    pub fitted_on: Vec<usize>,
}

/// The preprocessing property: the training preprocessing, and whether the graph applies the
/// scaling itself (then a runtime feeds the resized pixels unchanged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnnxPreprocessing {
    #[serde(flatten)]
    pub steps: Preprocessing,
    /// `x * scale + offset` is part of the graph.
    pub scaling_in_graph: bool,
}

string_enum! {
    /// Element type of the graph's input.
    pub enum InputType {
        /// Resized pixels, 0-255; the graph scales them.
        Uint8 = "uint8",
        /// Scaled pixels (`x * scale + offset`).
        Float32 = "float32",
    }
}

string_enum! {
    /// Number format of a file's weights and arithmetic.
    pub enum Precision {
        Float32 = "float32",
        /// Weights and activations in float16 (for the CUDA execution provider).
        Float16 = "float16",
        /// int8 weights and uint8 activations in ONNX's QDQ form (for CPUs).
        Int8 = "int8",
    }
}

/// Everything a runtime learns from the metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxInfo {
    pub description: ModelDescription,
    pub model_version: i64,
    pub input_type: InputType,
    pub preprocessing: OnnxPreprocessing,
    pub toolchain: String,
    pub precision: Precision,
    /// An int8 file's calibration, as written (JSON).
    pub calibration: Option<serde_json::Value>,
    /// `Some("flip")` when the graph averages each image with its mirror image.
    pub test_time_augmentation: Option<String>,
    /// The out-of-distribution output's threshold, when the file has one.
    pub ood: Option<OodMeta>,
}

impl OnnxInfo {
    /// Bits of an int8 file's weights (its calibration's `weight_bits`; files written before
    /// that field used the full 8), `None` for float files.
    pub fn int8_weight_bits(&self) -> Option<u8> {
        (self.precision == Precision::Int8)
            .then(|| self.calibration.as_ref().and_then(|c| c["weight_bits"].as_u64()).map_or(8, |b| b.min(8) as u8))
    }
}

/// A missing or malformed metadata property.
#[derive(Debug, thiserror::Error)]
#[error("ONNX metadata property `{key}`: {reason}")]
pub struct MetaError {
    pub key: &'static str,
    pub reason: String,
}

/// The metadata properties of a model exported from `desc`.
pub fn properties(
    desc: &ModelDescription,
    input_type: InputType,
    model_version: i64,
    toolchain: &str,
) -> Vec<(String, String)> {
    let pre = OnnxPreprocessing { steps: desc.preprocessing.clone(), scaling_in_graph: input_type == InputType::Uint8 };
    vec![
        (CLASSES.into(), json(&desc.classes)),
        (INPUT_SIZE.into(), desc.input_size.to_string()),
        (LAYOUT.into(), desc.layout.as_str().into()),
        (INPUT_TYPE.into(), input_type.as_str().into()),
        (PREPROCESSING.into(), json(&pre)),
        (MODEL_NAME.into(), desc.name.clone()),
        (MODEL_VERSION.into(), model_version.to_string()),
        (ARCHITECTURE.into(), desc.architecture.as_str().into()),
        (HEAD.into(), json(&desc.head)),
        (METRICS.into(), json(&desc.metrics)),
        (SOURCE.into(), desc.source.clone()),
        (TOOLCHAIN.into(), toolchain.into()),
    ]
}

/// Longest metadata property read, bytes (the longest written, `metrics`, is a few hundred).
pub const MAX_PROPERTY_BYTES: usize = 1 << 20;

/// Reads the properties back; `get` returns a property's value. Values over
/// [`MAX_PROPERTY_BYTES`] and descriptions over the bounds of [`ModelDescription::validate`]
/// are errors naming the property.
pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<OnnxInfo, MetaError> {
    for key in KEYS {
        if let Some(n) = get(key).map(|v| v.len()).filter(|&n| n > MAX_PROPERTY_BYTES) {
            return Err(MetaError { key, reason: format!("{n} bytes, more than the {MAX_PROPERTY_BYTES} allowed") });
        }
    }
    parse_checked(get)
}

/// Every property this module writes.
const KEYS: [&str; 16] = [
    CLASSES,
    INPUT_SIZE,
    LAYOUT,
    INPUT_TYPE,
    PREPROCESSING,
    MODEL_NAME,
    MODEL_VERSION,
    ARCHITECTURE,
    HEAD,
    METRICS,
    SOURCE,
    TOOLCHAIN,
    PRECISION,
    CALIBRATION,
    TEST_TIME_AUGMENTATION,
    OOD,
];

fn parse_checked(get: impl Fn(&str) -> Option<String>) -> Result<OnnxInfo, MetaError> {
    fn need(get: &impl Fn(&str) -> Option<String>, key: &'static str) -> Result<String, MetaError> {
        get(key).ok_or(MetaError { key, reason: "missing (was the file written by this toolchain's exporter?)".into() })
    }
    fn json<T: serde::de::DeserializeOwned>(
        get: &impl Fn(&str) -> Option<String>,
        key: &'static str,
    ) -> Result<T, MetaError> {
        serde_json::from_str(&need(get, key)?).map_err(|e| MetaError { key, reason: format!("not valid JSON: {e}") })
    }
    fn parsed<T: std::str::FromStr<Err = String>>(
        get: &impl Fn(&str) -> Option<String>,
        key: &'static str,
    ) -> Result<T, MetaError> {
        need(get, key)?.trim().parse().map_err(|reason| MetaError { key, reason })
    }
    let classes: Vec<String> = json(&get, CLASSES)?;
    let input_size: usize = need(&get, INPUT_SIZE)?
        .trim()
        .parse()
        .map_err(|e| MetaError { key: INPUT_SIZE, reason: format!("not a number: {e}") })?;
    let preprocessing: OnnxPreprocessing = json(&get, PREPROCESSING)?;
    let head: Option<Head> = json(&get, HEAD)?;
    let model_version = need(&get, MODEL_VERSION)?
        .trim()
        .parse()
        .map_err(|e| MetaError { key: MODEL_VERSION, reason: format!("not a number: {e}") })?;
    let metrics: Option<serde_json::Value> = json(&get, METRICS)?;
    let description = ModelDescription {
        format: FORMAT_VERSION,
        name: need(&get, MODEL_NAME)?,
        architecture: parsed(&get, ARCHITECTURE)?,
        input_size,
        layout: parsed(&get, LAYOUT)?,
        preprocessing: preprocessing.steps.clone(),
        head,
        classes,
        source: get(SOURCE).unwrap_or_default(),
        dataset: None,
        metrics,
    };
    description
        .validate(std::path::Path::new("ONNX metadata"))
        .map_err(|e| MetaError { key: "model description", reason: e.to_string() })?;
    Ok(OnnxInfo {
        description,
        model_version,
        input_type: parsed(&get, INPUT_TYPE)?,
        preprocessing,
        toolchain: get(TOOLCHAIN).unwrap_or_default(),
        precision: match get(PRECISION) {
            Some(p) => p.trim().parse().map_err(|reason| MetaError { key: PRECISION, reason })?,
            None => Precision::Float32,
        },
        test_time_augmentation: match get(TEST_TIME_AUGMENTATION) {
            Some(t) if t == FLIP => Some(t),
            Some(t) => {
                return Err(MetaError { key: TEST_TIME_AUGMENTATION, reason: format!("`{t}`: only `{FLIP}` is known") })
            }
            None => None,
        },
        ood: match get(OOD) {
            Some(o) => {
                let m: OodMeta = serde_json::from_str(&o)
                    .map_err(|e| MetaError { key: OOD, reason: format!("not valid JSON: {e}") })?;
                if !m.threshold.is_finite() {
                    return Err(MetaError { key: OOD, reason: format!("threshold {} is not a number", m.threshold) });
                }
                Some(m)
            }
            None => None,
        },
        calibration: match get(CALIBRATION) {
            Some(c) => Some(
                serde_json::from_str(&c)
                    .map_err(|e| MetaError { key: CALIBRATION, reason: format!("not valid JSON: {e}") })?,
            ),
            None => None,
        },
    })
}

/// Compact JSON of one of our values (which always serialise).
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serialisable")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn desc() -> ModelDescription {
        ModelDescription {
            format: FORMAT_VERSION,
            name: "footwear".into(),
            architecture: crate::Architecture::Xception,
            input_size: 224,
            layout: crate::Layout::Nhwc,
            preprocessing: Preprocessing::default(),
            head: Some(Head { inner: 100, dropout: 0.2, classes: 3 }),
            classes: vec!["boot".into(), "sandal".into(), "shoe".into()],
            source: "run".into(),
            dataset: None,
            metrics: Some(serde_json::json!({"test_accuracy": 0.99})),
        }
    }

    #[test]
    fn properties_round_trip() {
        let props: HashMap<String, String> =
            properties(&desc(), InputType::Uint8, 3, "exporter 0.1").into_iter().collect();
        assert_eq!(props[CLASSES], r#"["boot","sandal","shoe"]"#);
        assert_eq!(props[INPUT_SIZE], "224");
        let info = parse(|k| props.get(k).cloned()).unwrap();
        assert_eq!(info.description, desc());
        assert_eq!(info.model_version, 3);
        assert_eq!(info.input_type, InputType::Uint8);
        assert!(info.preprocessing.scaling_in_graph);
        assert_eq!((info.precision, info.calibration.clone()), (Precision::Float32, None));
        assert_eq!(info.ood, None);
        let mut with_ood = props.clone();
        let ood = OodMeta {
            method: "mahalanobis".into(),
            threshold: 4.82,
            rejection_rate: 0.01,
            set_on: "validation".into(),
            photos: 1800,
            rejected: 0.01,
            fitted_on: vec![3200, 3200, 3200],
        };
        with_ood.insert(OOD.into(), serde_json::to_string(&ood).unwrap());
        assert_eq!(parse(|k| with_ood.get(k).cloned()).unwrap().ood, Some(ood));
        with_ood.insert(OOD.into(), r#"{"method":"mahalanobis"}"#.into());
        assert_eq!(parse(|k| with_ood.get(k).cloned()).unwrap_err().key, OOD);
        assert_eq!(info.int8_weight_bits(), None);
        let mut int8 = props.clone();
        int8.insert(PRECISION.into(), "int8".into());
        int8.insert(CALIBRATION.into(), r#"{"method":"percentile"}"#.into());
        let info = parse(|k| int8.get(k).cloned()).unwrap();
        assert_eq!(info.precision, Precision::Int8);
        // Files from before `weight_bits` have full-range (8-bit) weights.
        assert_eq!(info.int8_weight_bits(), Some(8));
        assert_eq!(info.calibration.unwrap()["method"], "percentile");
        int8.insert(CALIBRATION.into(), r#"{"method":"minmax","weight_bits":7}"#.into());
        assert_eq!(parse(|k| int8.get(k).cloned()).unwrap().int8_weight_bits(), Some(7));
        int8.insert(PRECISION.into(), "int4".into());
        let e = parse(|k| int8.get(k).cloned()).unwrap_err();
        assert_eq!(e.key, PRECISION);
    }

    #[test]
    fn oversized_properties_and_descriptions_are_refused() {
        let mut props: HashMap<String, String> = properties(&desc(), InputType::Uint8, 1, "t").into_iter().collect();
        props.insert(SOURCE.into(), "s".repeat(MAX_PROPERTY_BYTES + 1));
        let e = parse(|k| props.get(k).cloned()).unwrap_err().to_string();
        assert!(e.contains("`source`") && e.contains("allowed"), "{e}");
        let mut props: HashMap<String, String> = properties(&desc(), InputType::Uint8, 1, "t").into_iter().collect();
        props.insert(INPUT_SIZE.into(), "1000000".into());
        let e = parse(|k| props.get(k).cloned()).unwrap_err().to_string();
        assert!(e.contains("input_size"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let mut props: HashMap<String, String> = properties(&desc(), InputType::Float32, 1, "t").into_iter().collect();
        props.remove(CLASSES);
        let e = parse(|k| props.get(k).cloned()).unwrap_err().to_string();
        assert!(e.contains("`classes`") && e.contains("missing"), "{e}");
        let mut props: HashMap<String, String> = properties(&desc(), InputType::Float32, 1, "t").into_iter().collect();
        props.insert(INPUT_SIZE.into(), "big".into());
        assert!(parse(|k| props.get(k).cloned()).unwrap_err().to_string().contains("`input_size`"));
        props.insert(INPUT_SIZE.into(), "224".into());
        props.insert(CLASSES.into(), r#"["a","b"]"#.into());
        let e = parse(|k| props.get(k).cloned()).unwrap_err().to_string();
        assert!(e.contains("classes"), "{e}");
    }
}
