//! Hyperparameter sweep: every combination of a grid of learning rate, batch size, seed,
//! dropout, inner size and image size, reusing the feature caches (built once per image size),
//! ranked by validation accuracy. Writes `sweep.csv`, `sweep.md`, `sweep.png`, and keeps the
//! weights of the best run only.

use crate::config::{Refit, TrainConfig};
use crate::train::{prepare, train_prepared};
use candle_core::Device;
use plotters::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The values to try; an empty list keeps the configuration's value.
#[derive(Debug, Clone, Default)]
pub struct Grid {
    pub lr: Vec<f64>,
    pub batch_size: Vec<usize>,
    pub seed: Vec<u64>,
    pub dropout: Vec<f64>,
    pub inner: Vec<usize>,
    pub image_size: Vec<usize>,
}

/// One finished run of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub run: String,
    pub image_size: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub seed: u64,
    pub dropout: f64,
    pub inner: usize,
    pub val_accuracy: f64,
    pub val_macro_f1: f64,
    /// `None` when the test split is skipped.
    pub test_accuracy: Option<f64>,
    pub seconds: f64,
}

fn or<T: Clone>(v: &[T], d: T) -> Vec<T> {
    if v.is_empty() {
        vec![d]
    } else {
        v.to_vec()
    }
}

/// Runs the sweep under `out`; returns the rows sorted best first.
pub fn sweep(base: &TrainConfig, grid: &Grid, out: &Path, dev: &Device) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(
        base.refit != Refit::All,
        "a sweep ranks recipes on validation, and --refit all trains on it (use --refit half or off)"
    );
    std::fs::create_dir_all(out)?;
    let mut rows: Vec<Row> = Vec::new();
    let mut best: Option<(f64, PathBuf)> = None;
    // The size `auto` gives this folder; the other `auto` settings follow each run's batch size.
    let default_size = base.resolve(&crate::train::data_size(&crate::train::dataset(base)?)).image_size.get();
    for size in or(&grid.image_size, default_size) {
        let mut cfg = base.clone();
        cfg.image_size = size.into();
        let prepared = prepare(&cfg, dev)?;
        for lr in or(&grid.lr, base.head.lr) {
            for batch_size in or(&grid.batch_size, base.batch_size) {
                for seed in or(&grid.seed, base.seed) {
                    for dropout in or(&grid.dropout, base.dropout) {
                        for inner in or(&grid.inner, base.inner) {
                            let run = format!("s{size}-lr{lr:e}-b{batch_size}-seed{seed}-d{dropout}-i{inner}");
                            let mut c = cfg.clone();
                            // The fine-tuning rate keeps its ratio to the head's.
                            c.fine_tune.lr = base.fine_tune.lr * lr / base.head.lr;
                            (c.head.lr, c.batch_size, c.seed, c.dropout, c.inner) =
                                (lr, batch_size, seed, dropout, inner);
                            c.out = out.join("runs").join(&run);
                            c.validate()?;
                            tracing::info!("sweep run {}: {run}", rows.len() + 1);
                            let o = train_prepared(&c, &prepared, None, dev)?;
                            let row = Row {
                                run: run.clone(),
                                image_size: size,
                                lr,
                                batch_size,
                                seed,
                                dropout,
                                inner,
                                val_accuracy: o.validation.accuracy,
                                val_macro_f1: o.validation.macro_f1,
                                test_accuracy: o.test.as_ref().map(|t| t.accuracy),
                                seconds: o.seconds,
                            };
                            // Only the best run's weights are kept.
                            let weights = c.out.join(modelspec::WEIGHTS_FILE);
                            match &best {
                                Some((acc, _)) if *acc >= row.val_accuracy => {
                                    let _ = std::fs::remove_file(&weights);
                                }
                                _ => {
                                    if let Some((_, old)) = best.replace((row.val_accuracy, c.out.clone())) {
                                        let _ = std::fs::remove_file(old.join(modelspec::WEIGHTS_FILE));
                                    }
                                }
                            }
                            rows.push(row);
                            write(&rows, out)?;
                        }
                    }
                }
            }
        }
    }
    rows.sort_by(|a, b| b.val_accuracy.total_cmp(&a.val_accuracy).then(b.val_macro_f1.total_cmp(&a.val_macro_f1)));
    write(&rows, out)?;
    if let Some((_, dir)) = best {
        std::fs::write(out.join("BEST"), format!("{}\n", dir.display()))?;
    }
    Ok(rows)
}

fn write(rows: &[Row], out: &Path) -> anyhow::Result<()> {
    let mut sorted = rows.to_vec();
    sorted.sort_by(|a, b| b.val_accuracy.total_cmp(&a.val_accuracy));
    let mut w = csv::Writer::from_path(out.join("sweep.csv"))?;
    for r in &sorted {
        w.serialize(r)?;
    }
    w.flush()?;
    let mut md = String::from("| run | val acc | val macro-F1 | test acc | seconds |\n|---|---|---|---|---|\n");
    for r in &sorted {
        md += &format!(
            "| {} | {:.4} | {:.4} | {} | {:.0} |\n",
            r.run,
            r.val_accuracy,
            r.val_macro_f1,
            r.test_accuracy.map_or("-".into(), |a| format!("{a:.4}")),
            r.seconds
        );
    }
    std::fs::write(out.join("sweep.md"), md)?;
    if let Err(e) = plot(&sorted, &out.join("sweep.png")) {
        tracing::warn!("sweep.png: {e}");
    }
    Ok(())
}

/// Validation accuracy of every run, best first, as horizontal bars.
fn plot(rows: &[Row], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    if !crate::plots::font_available() || rows.is_empty() {
        return Ok(());
    }
    let h = 60 + 28 * rows.len() as u32;
    let root = BitMapBackend::new(path, (1100, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let lo = rows.iter().map(|r| r.val_accuracy).fold(1.0, f64::min) - 0.02;
    let mut chart = ChartBuilder::on(&root)
        .caption("validation accuracy", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(420)
        .build_cartesian_2d(lo.max(0.0)..1.0, (0..rows.len()).into_segmented())?;
    let names: Vec<String> = rows.iter().map(|r| r.run.clone()).collect();
    chart
        .configure_mesh()
        .y_labels(rows.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 13))
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        Rectangle::new(
            [(lo.max(0.0), SegmentValue::Exact(i)), (r.val_accuracy, SegmentValue::Exact(i + 1))],
            BLUE.mix(0.6).filled(),
        )
    }))?;
    root.present()?;
    Ok(())
}
