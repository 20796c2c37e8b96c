//! `keras-import`: converts Keras weights (`.keras`, Keras 3 `.weights.h5`, classic `.h5`) into
//! a model directory (`model.safetensors` + `model.json`) that the trainer and exporter read.

use anyhow::Context;
use clap::Parser;
use models::keras_import::{import, ImportOptions};
use models::weights::write_model_dir;
use std::path::PathBuf;

/// Convert a Keras Xception model or weights file into a model directory.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The Keras file: `.keras`, Keras 3 `.weights.h5`, or classic Keras `.h5` weights.
    input: PathBuf,
    /// Output model directory (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// Model name written into the description.
    #[arg(long, default_value = "xception")]
    name: String,
    /// Input size written into the description.
    #[arg(long, default_value_t = 150)]
    input_size: usize,
    /// Class names, comma-separated, in logit order.
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// Keep the Xception base only (ImageNet features), dropping any head.
    #[arg(long)]
    base_only: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let opts = ImportOptions {
        name: a.name,
        input_size: a.input_size,
        classes: a.classes,
        base_only: a.base_only,
        max_member_bytes: models::keras_import::MAX_MEMBER_BYTES,
    };
    let imported = import(&a.input, &opts).with_context(|| format!("importing {}", a.input.display()))?;
    write_model_dir(&a.out, &imported.description, &imported.tensors)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let params: usize = imported.tensors.iter().map(|(_, t)| t.elem_count()).sum();
    println!(
        "{}: {} tensors, {params} parameters, head: {:?} -> {}",
        a.input.display(),
        imported.tensors.len(),
        imported.description.head,
        a.out.display()
    );
    Ok(())
}
