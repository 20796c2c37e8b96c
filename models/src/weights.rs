//! Model directories: `model.json` (the [`ModelDescription`]) beside `model.safetensors`, with
//! the tensor names of [`crate::layers`]. Loading checks every tensor's presence, dtype and shape
//! first, so that a truncated or mismatched file gives an error naming the file and the tensor,
//! not a panic deep inside the network.

use crate::error::{ModelError, Result};
use crate::head;
use crate::layers::{self, TensorSpec, WeightLayer};
use candle_core::{DType, Device, Tensor};
use modelspec::{ModelDescription, DESCRIPTION_FILE, WEIGHTS_FILE};
use std::collections::HashMap;
use std::path::Path;

/// Every tensor a model with this description must have.
pub fn expected_tensors(desc: &ModelDescription) -> Vec<TensorSpec> {
    let mut t = layers::base_tensors();
    if let Some(h) = &desc.head {
        t.extend(WeightLayer::dense(head::DENSE, layers::FEATURES, h.inner).tensors());
        t.extend(WeightLayer::dense(head::LOGITS, h.inner, h.classes).tensors());
    }
    t
}

/// Reads a safetensors file and checks it holds exactly the expected f32 tensors.
pub fn read_checked(path: &Path, expected: &[TensorSpec], dev: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(ModelError::io(path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::format(path, format!("not a valid safetensors file ({e})")))?;
    let mut out = HashMap::with_capacity(expected.len());
    for spec in expected {
        let view = st
            .tensor(&spec.name)
            .map_err(|_| ModelError::MissingTensor { path: path.into(), tensor: spec.name.clone() })?;
        if view.shape() != spec.shape.as_slice() {
            return Err(ModelError::Shape {
                path: path.into(),
                tensor: spec.name.clone(),
                found: view.shape().to_vec(),
                expected: spec.shape.clone(),
            });
        }
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(ModelError::Tensor {
                path: path.into(),
                tensor: spec.name.clone(),
                reason: format!("dtype {:?}, expected F32", view.dtype()),
            });
        }
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        out.insert(spec.name.clone(), Tensor::from_vec(data, spec.shape.as_slice(), dev)?);
    }
    Ok(out)
}

/// A loaded model directory: its description and its checked tensors.
pub struct ModelDir {
    pub description: ModelDescription,
    pub tensors: HashMap<String, Tensor>,
}

impl ModelDir {
    /// Loads `dir/model.json` and `dir/model.safetensors`.
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let description = ModelDescription::load(&dir.join(DESCRIPTION_FILE))?;
        let tensors = read_checked(&dir.join(WEIGHTS_FILE), &expected_tensors(&description), dev)?;
        Ok(Self { description, tensors })
    }

    /// A `VarBuilder` over the tensors (for frozen use; the trainer builds its own `VarMap`).
    pub fn var_builder(&self, dev: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_tensors(self.tensors.clone(), DType::F32, dev)
    }
}

/// Writes `model.safetensors` and `model.json` into an existing directory, each atomically
/// (temporary file, then rename), weights first: a reader never sees half a file.
pub fn write_model_files(dir: &Path, desc: &ModelDescription, tensors: &[(String, Tensor)]) -> Result<()> {
    desc.validate(&dir.join(DESCRIPTION_FILE))?;
    std::fs::create_dir_all(dir).map_err(ModelError::io(dir))?;
    let st_tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    candle_core::safetensors::save(&tensors.iter().cloned().collect::<HashMap<_, _>>(), &st_tmp)?;
    std::fs::rename(&st_tmp, dir.join(WEIGHTS_FILE)).map_err(ModelError::io(dir.join(WEIGHTS_FILE)))?;
    let json_tmp = dir.join(format!(".{DESCRIPTION_FILE}.tmp"));
    std::fs::write(&json_tmp, desc.to_json()).map_err(ModelError::io(&json_tmp))?;
    std::fs::rename(&json_tmp, dir.join(DESCRIPTION_FILE)).map_err(ModelError::io(dir.join(DESCRIPTION_FILE)))?;
    Ok(())
}

/// Writes a model directory atomically: both files go to a temporary directory beside `dir`,
/// which then replaces `dir`, so that a crash never leaves half a model behind.
pub fn write_model_dir(dir: &Path, desc: &ModelDescription, tensors: &[(String, Tensor)]) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(ModelError::io(parent))?;
    let name = dir.file_name().ok_or_else(|| ModelError::format(dir, "not a directory name"))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    write_model_files(&tmp, desc, tensors)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(ModelError::io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(ModelError::io(dir))?;
    Ok(())
}
