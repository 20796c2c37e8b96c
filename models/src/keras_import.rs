//! Keras weights → our model directory (safetensors + description), in Rust, no Python.
//!
//! Three inputs are understood:
//! - a Keras 3 `.keras` file: a zip of `config.json` and `model.weights.h5`, whose h5 groups
//!   are named by class and a per-class counter in layer order (`conv2d_1`,
//!   `separable_conv2d_33`), not by layer name;
//! - a Keras 3 `.weights.h5` file (the same h5 layout, without the zip);
//! - a classic Keras `.h5` weights file (`model.save_weights` of Keras 2, e.g.
//!   `xception_weights_tf_dim_ordering_tf_kernels_notop.h5`): root attribute `layer_names`,
//!   each layer group listing its datasets in attribute `weight_names`.
//!
//! Either way the layers that hold weights are matched, in order, against
//! [`layers::weight_layers`], every variable's shape is checked, and each one is mapped onto
//! our tensors by [`WeightLayer::tensors`]. An Xception base followed by the classic head
//! (two Dense layers) imports as a classifier; `base_only` keeps the base alone.

use crate::error::{ModelError, Result};
use crate::head;
use crate::layers::{self, KerasClass, Transform, WeightLayer};
use candle_core::{Device, Tensor};
use hdf5_pure::AttrValue;
use modelspec::{Head, ModelDescription, Preprocessing, FORMAT_VERSION};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What to import and how to describe it.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Name written into the description.
    pub name: String,
    /// Input size written into the description (the weights work at any size >= 71).
    pub input_size: usize,
    /// Class names in logit order; `class_0`, `class_1`, ... when not given.
    pub classes: Option<Vec<String>>,
    /// Import the Xception base only, ignoring any head.
    pub base_only: bool,
    /// Largest member of a `.keras` zip once inflated, bytes ([`MAX_MEMBER_BYTES`] by default):
    /// a zip bomb is refused instead of inflated.
    pub max_member_bytes: u64,
}

/// An imported model, ready for [`crate::weights::write_model_dir`].
pub struct Imported {
    pub description: ModelDescription,
    pub tensors: Vec<(String, Tensor)>,
}

/// One layer that holds weights in the source file: a label for errors and its datasets.
#[derive(Debug, Clone)]
struct SourceLayer {
    label: String,
    vars: Vec<String>,
}

/// The layers found in a file: the Xception base's, in order, and the head's Dense layers.
struct Found {
    base: Vec<SourceLayer>,
    head: Vec<SourceLayer>,
    dropout: Option<f32>,
}

/// Imports a `.keras`, Keras 3 `.weights.h5` or classic `.h5` file.
/// Largest `.keras` member read by default: Xception's weights file is about 90 MB.
pub const MAX_MEMBER_BYTES: u64 = 1 << 30;

pub fn import(path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let bytes = std::fs::read(path).map_err(ModelError::io(path))?;
    let (h5_bytes, config, h5_label) = if bytes.starts_with(b"PK") {
        let (h5, config) = unzip_keras(path, &bytes, opts.max_member_bytes)?;
        (h5, Some(config), path.join("model.weights.h5"))
    } else if bytes.starts_with(b"\x89HDF\r\n\x1a\n") {
        (bytes, None, path.to_path_buf())
    } else {
        return Err(ModelError::format(path, "neither a .keras zip nor an HDF5 weights file"));
    };
    let h5 = hdf5_pure::File::from_bytes(h5_bytes)
        .map_err(|e| ModelError::format(&h5_label, format!("not a readable HDF5 file ({e})")))?;
    let found = if h5.group("layers").is_ok() {
        find_keras3(&h5, &h5_label, config.as_ref())?
    } else {
        find_legacy(&h5, &h5_label)?
    };
    build(&h5, &h5_label, found, path, opts)
}

/// Reads `model.weights.h5` and `config.json` out of a `.keras` zip.
fn unzip_keras(path: &Path, bytes: &[u8], max: u64) -> Result<(Vec<u8>, serde_json::Value)> {
    let bad = |what: String| ModelError::format(path, what);
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| bad(format!("not a valid .keras zip ({e})")))?;
    let mut member = |name: &str| -> Result<Vec<u8>> {
        let f = zip.by_name(name).map_err(|e| bad(format!("{name}: {e}")))?;
        let too_big = |n: u64| bad(format!("{name}: {n} bytes inflated, more than the {max} allowed"));
        if f.size() > max {
            return Err(too_big(f.size()));
        }
        // The declared size can lie: read one byte past the limit at most.
        let mut v = Vec::with_capacity(f.size().min(1 << 20) as usize);
        f.take(max.saturating_add(1)).read_to_end(&mut v).map_err(|e| bad(format!("{name}: {e} (truncated file?)")))?;
        if v.len() as u64 > max {
            return Err(too_big(v.len() as u64));
        }
        Ok(v)
    };
    let h5 = member("model.weights.h5")?;
    let config = serde_json::from_slice(&member("config.json")?).map_err(|e| bad(format!("config.json: {e}")))?;
    Ok((h5, config))
}

/// Finds the Xception base inside a Keras 3 weights file: the group holding `separable_conv2d`,
/// either `layers` itself (a bare Xception) or a nested model's `layers/<model>/layers`.
fn find_keras3(h5: &hdf5_pure::File, label: &Path, config: Option<&serde_json::Value>) -> Result<Found> {
    fn search(h5: &hdf5_pure::File, prefix: &str, depth: usize) -> Option<String> {
        let groups = h5.group(prefix).ok()?.groups().ok()?;
        if groups.iter().any(|g| g == "separable_conv2d") {
            return Some(prefix.to_string());
        }
        if depth == 0 {
            return None;
        }
        groups.iter().find_map(|g| search(h5, &format!("{prefix}/{g}/layers"), depth - 1))
    }
    let base_prefix = search(h5, "layers", 3)
        .ok_or_else(|| ModelError::format(label, "no Xception inside: no `separable_conv2d` group under `layers`"))?;
    let var_paths = |group: &str| -> Result<Vec<String>> {
        let vars = format!("{group}/vars");
        let mut names = h5.group(&vars).and_then(|g| g.datasets()).unwrap_or_default();
        names.sort_by_key(|n| n.parse::<usize>().unwrap_or(usize::MAX));
        Ok(names.into_iter().map(|n| format!("{vars}/{n}")).collect())
    };
    // Keras 3 names the h5 groups by class and a counter in layer order.
    let mut counters: HashMap<KerasClass, usize> = HashMap::new();
    let mut base = Vec::new();
    for layer in layers::weight_layers() {
        let k = counters.entry(layer.class).or_insert(0);
        let group = match *k {
            0 => format!("{base_prefix}/{}", layer.class.h5_prefix()),
            n => format!("{base_prefix}/{}_{n}", layer.class.h5_prefix()),
        };
        *k += 1;
        base.push(SourceLayer { vars: var_paths(&group)?, label: format!("{group} ({})", layer.name) });
    }
    // The head: Dense layers at the top level, `dense`, `dense_1`, ... in layer order.
    let mut dense: Vec<(usize, String)> = h5
        .group("layers")
        .and_then(|g| g.groups())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|g| {
            let n = match g.strip_prefix("dense") {
                Some("") => 0,
                Some(rest) => rest.strip_prefix('_')?.parse().ok()?,
                None => return None,
            };
            Some((n, g))
        })
        .collect();
    dense.sort();
    let head = dense
        .into_iter()
        .map(|(_, g)| {
            let group = format!("layers/{g}");
            Ok(SourceLayer { vars: var_paths(&group)?, label: group })
        })
        .collect::<Result<_>>()?;
    let dropout = config.and_then(find_dropout);
    Ok(Found { base, head, dropout })
}

/// The rate of the first `Dropout` layer of a Keras model config, if any.
fn find_dropout(v: &serde_json::Value) -> Option<f32> {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("class_name").and_then(|c| c.as_str()) == Some("Dropout") {
                return m.get("config")?.get("rate")?.as_f64().map(|r| r as f32);
            }
            m.values().find_map(find_dropout)
        }
        serde_json::Value::Array(a) => a.iter().find_map(find_dropout),
        _ => None,
    }
}

/// The strings of a string or string-array attribute.
fn attr_strings(v: &AttrValue) -> Option<Vec<String>> {
    match v {
        AttrValue::String(s)
        | AttrValue::AsciiString(s)
        | AttrValue::VarLenString(s)
        | AttrValue::VarLenAsciiString(s) => Some(vec![s.clone()]),
        AttrValue::StringArray(a)
        | AttrValue::AsciiStringArray(a)
        | AttrValue::VarLenStringArray(a)
        | AttrValue::VarLenAsciiStringArray(a)
        | AttrValue::VarLenAsciiCharArray(a) => Some(a.clone()),
        AttrValue::StringSized { value, .. } => Some(vec![value.clone()]),
        AttrValue::StringArraySized { values, .. } => Some(values.clone()),
        _ => None,
    }
}

/// Lists the layers of a classic Keras weights file. Weight names look like
/// `block1_conv1/kernel:0` (or, inside a nested model's group, the same); the part before the
/// last `/` names the layer, which keeps nested models flat and in order.
fn find_legacy(h5: &hdf5_pure::File, label: &Path) -> Result<Found> {
    let root = h5.root().attrs().map_err(|e| ModelError::format(label, format!("cannot read attributes ({e})")))?;
    let names = root.get("layer_names").and_then(attr_strings).ok_or_else(|| {
        ModelError::format(label, "no `layers` group and no `layer_names` attribute: not a Keras weights file")
    })?;
    let mut layers: Vec<SourceLayer> = Vec::new();
    for name in names {
        let attrs = h5
            .group(&name)
            .and_then(|g| g.attrs())
            .map_err(|e| ModelError::format(label, format!("layer `{name}`: {e}")))?;
        for w in attrs.get("weight_names").and_then(attr_strings).unwrap_or_default() {
            let layer = w.rsplit_once('/').map(|(l, _)| l.to_string()).unwrap_or_else(|| name.clone());
            let path = format!("{name}/{w}");
            match layers.last_mut() {
                Some(l) if l.label == layer => l.vars.push(path),
                _ => layers.push(SourceLayer { label: layer, vars: vec![path] }),
            }
        }
    }
    let n = layers::weight_layers().len();
    if layers.len() < n {
        return Err(ModelError::format(label, format!("{} layers hold weights, Xception has {n}", layers.len())));
    }
    let head = layers.split_off(n);
    Ok(Found { base: layers, head, dropout: None })
}

/// Reads one variable, checks its shape against Keras' and maps it onto our tensor.
fn read_var(
    h5: &hdf5_pure::File,
    label: &Path,
    src: &SourceLayer,
    layer: &WeightLayer,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    if src.vars.len() != layer.keras_shapes.len() {
        return Err(ModelError::Tensor {
            path: label.into(),
            tensor: src.label.clone(),
            reason: format!(
                "{} variables, expected {} for {} `{}`",
                src.vars.len(),
                layer.keras_shapes.len(),
                layer.class.name(),
                layer.name
            ),
        });
    }
    for spec in layer.tensors() {
        let var = &src.vars[spec.keras_var];
        let keras_shape = &layer.keras_shapes[spec.keras_var];
        let tensor = format!("{var} ({})", spec.name);
        let ds =
            h5.dataset(var).map_err(|_| ModelError::MissingTensor { path: label.into(), tensor: tensor.clone() })?;
        let bad = |reason: String| ModelError::Tensor { path: label.into(), tensor: tensor.clone(), reason };
        let shape: Vec<usize> = ds.shape().map_err(|e| bad(e.to_string()))?.into_iter().map(|d| d as usize).collect();
        if &shape != keras_shape {
            return Err(ModelError::Shape { path: label.into(), tensor, found: shape, expected: keras_shape.clone() });
        }
        let data = ds.read_f32().map_err(|e| bad(format!("{e} (truncated file?)")))?;
        if data.len() != shape.iter().product::<usize>() {
            return Err(bad(format!("{} values for shape {shape:?}", data.len())));
        }
        let t = match spec.transform {
            Transform::Reshape => Tensor::from_vec(data, spec.shape.as_slice(), &Device::Cpu)?,
            Transform::Transpose => Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?.t()?.contiguous()?,
        };
        out.push((spec.name, t));
    }
    Ok(out)
}

fn build(h5: &hdf5_pure::File, label: &Path, found: Found, path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let mut tensors = Vec::new();
    for (src, layer) in found.base.iter().zip(layers::weight_layers()) {
        tensors.extend(read_var(h5, label, src, &layer)?);
    }
    let head = if opts.base_only {
        None
    } else {
        match found.head.as_slice() {
            [] => None,
            [dense, logits] => {
                let shape = |s: &SourceLayer| -> Result<Vec<usize>> {
                    let ds = h5
                        .dataset(&s.vars[0])
                        .map_err(|_| ModelError::MissingTensor { path: label.into(), tensor: s.vars[0].clone() })?;
                    let shape = ds.shape().map_err(|e| ModelError::format(label, format!("{}: {e}", s.vars[0])))?;
                    Ok(shape.into_iter().map(|d| d as usize).collect())
                };
                let (d, l) = (shape(dense)?, shape(logits)?);
                let (inner, classes) = (d.get(1).copied().unwrap_or(0), l.get(1).copied().unwrap_or(0));
                tensors.extend(read_var(h5, label, dense, &WeightLayer::dense(head::DENSE, layers::FEATURES, inner))?);
                tensors.extend(read_var(h5, label, logits, &WeightLayer::dense(head::LOGITS, inner, classes))?);
                Some(Head { inner, dropout: found.dropout.unwrap_or(0.0), classes })
            }
            other => {
                let names: Vec<_> = other.iter().map(|s| s.label.as_str()).collect();
                return Err(ModelError::format(
                    label,
                    format!("the head has {} Dense layers ({names:?}); only GAP → Dense → Dropout → Dense is supported (import with base_only to keep the base)", other.len()),
                ));
            }
        }
    };
    let classes = match (&head, &opts.classes) {
        (None, _) => Vec::new(),
        (Some(h), Some(c)) if c.len() == h.classes => c.clone(),
        (Some(h), Some(c)) => {
            return Err(ModelError::format(
                path,
                format!("{} class names given, the model has {} classes", c.len(), h.classes),
            ))
        }
        (Some(h), None) => (0..h.classes).map(|i| format!("class_{i}")).collect(),
    };
    let file_name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let description = ModelDescription {
        format: FORMAT_VERSION,
        name: opts.name.clone(),
        architecture: modelspec::Architecture::Xception,
        input_size: opts.input_size,
        layout: modelspec::Layout::Nhwc,
        preprocessing: Preprocessing::default(),
        head,
        classes,
        source: format!("Keras import of {file_name}"),
        dataset: None,
        metrics: None,
    };
    description.validate(&PathBuf::from(path))?;
    Ok(Imported { description, tensors })
}
