//! `trainer soup RUN_DIR... --out DIR`: a "model soup", the element-wise mean of the weights of
//! runs fine-tuned from the same start (members of one seed: `--member`), written as one run
//! directory that the exporter reads like any other. Unlike an ensemble it costs nothing at
//! inference; it only works for runs that stayed in one basin of the loss, which validation
//! tells.

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use models::weights::{write_model_dir, ModelDir};
use std::path::{Path, PathBuf};

/// Averages the weights of `runs` into the model directory `out`.
pub fn soup(runs: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let Some(first) = runs.first() else { bail!("no runs to average") };
    let load = |r: &PathBuf| {
        ModelDir::load(r, &Device::Cpu).with_context(|| format!("reading the model directory {}", r.display()))
    };
    let base = load(first)?;
    let mut sums: Vec<(String, Tensor)> = base.tensors.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
    sums.sort_by(|a, b| a.0.cmp(&b.0));
    for r in &runs[1..] {
        let d = load(r)?;
        let (a, b) = (&base.description, &d.description);
        if (a.architecture, a.input_size, &a.head, &a.classes) != (b.architecture, b.input_size, &b.head, &b.classes) {
            bail!("{}: another architecture, input size, head or classes than {}", r.display(), first.display());
        }
        for (k, t) in sums.iter_mut() {
            let other = d.tensors.get(k).with_context(|| format!("{}: no tensor {k}", r.display()))?;
            *t = (&*t + other)?;
        }
    }
    let n = runs.len() as f64;
    let tensors: Vec<(String, Tensor)> =
        sums.into_iter().map(|(k, t)| Ok((k, (t / n)?))).collect::<anyhow::Result<_>>()?;
    let mut desc = base.description.clone();
    desc.source = format!(
        "mean of the weights of {}",
        runs.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    desc.metrics = None;
    write_model_dir(out, &desc, &tensors).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
