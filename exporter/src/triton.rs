//! A Triton Inference Server model repository holding the same file: `<name>/config.pbtxt`
//! (ONNX Runtime backend, dynamic batching), `<name>/1/model.onnx`, and `<name>/labels.txt` for
//! Triton's classification extension.

use anyhow::Context;
use modelspec::onnx_meta::{FEATURES_NAME, INPUT_NAME, LOGITS_NAME, OOD_SCORE_NAME, PROBABILITIES_NAME};
use modelspec::ModelDescription;
use std::path::{Path, PathBuf};

/// `config.pbtxt` for `desc`; `ood`: the file has the `ood_score` output (one value per image:
/// dims [1] reshaped to [], Triton's form for it).
pub fn config(desc: &ModelDescription, max_batch: usize, fp16: bool, ood: bool) -> String {
    let s = desc.input_size;
    let outputs = match &desc.head {
        Some(h) => format!(
            "  {{ name: \"{LOGITS_NAME}\" data_type: TYPE_FP32 dims: [ {c} ] }},\n  \
             {{ name: \"{PROBABILITIES_NAME}\" data_type: TYPE_FP32 dims: [ {c} ] label_filename: \"labels.txt\" }}{}",
            if ood {
                format!(
                    ",\n  {{ name: \"{OOD_SCORE_NAME}\" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }}"
                )
            } else {
                String::new()
            },
            c = h.classes
        ),
        None => {
            format!("  {{ name: \"{FEATURES_NAME}\" data_type: TYPE_FP32 dims: [ {} ] }}", models::layers::FEATURES)
        }
    };
    let preferred: Vec<String> =
        [4usize, 8, 16, 32].iter().filter(|&&b| b <= max_batch).map(|b| b.to_string()).collect();
    format!(
        "# Written by the footwear exporter{}. Input: decoded RGB, resized to {s}x{s} ({}), as uint8;\n\
         # the graph scales it. Classes in output order: {:?}.\n\
         name: \"{name}\"\nbackend: \"onnxruntime\"\nmax_batch_size: {max_batch}\n\
         input [\n  {{ name: \"{INPUT_NAME}\" data_type: TYPE_UINT8 dims: [ {s}, {s}, 3 ] }}\n]\n\
         output [\n{outputs}\n]\n\
         dynamic_batching {{\n  preferred_batch_size: [ {} ]\n  max_queue_delay_microseconds: 2000\n}}\n\
         instance_group [ {{ kind: {} count: 1 }} ]\n",
        if fp16 { " (float16 weights)" } else { "" },
        desc.preprocessing.resize,
        desc.classes,
        preferred.join(", "),
        if fp16 { "KIND_GPU" } else { "KIND_AUTO" },
        name = desc.name,
    )
}

/// Writes `repo/<name>/` with a copy of `onnx`; the model folder is replaced atomically.
/// `ood`: the file has the `ood_score` output.
pub fn write(
    repo: &Path,
    desc: &ModelDescription,
    onnx: &Path,
    max_batch: usize,
    fp16: bool,
    ood: bool,
) -> anyhow::Result<PathBuf> {
    let dir = repo.join(&desc.name);
    let tmp = repo.join(format!(".{}.tmp-{}", desc.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("1")).with_context(|| format!("creating {}", tmp.display()))?;
    std::fs::copy(onnx, tmp.join("1/model.onnx")).with_context(|| format!("copying {}", onnx.display()))?;
    std::fs::write(tmp.join("config.pbtxt"), config(desc, max_batch, fp16, ood))?;
    std::fs::write(tmp.join("labels.txt"), desc.classes.join("\n") + "\n")?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("renaming to {}", dir.display()))?;
    Ok(dir)
}
