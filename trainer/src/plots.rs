//! PNG pictures of a run: learning curves (loss, accuracy, learning rate per epoch, both
//! phases) and the confusion matrices. Text uses DejaVu Sans from the system (Debian's
//! `fonts-dejavu-core`); without it the pictures are skipped with a warning.

use crate::history::Epoch;
use crate::metrics::Report;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Whether the font for the pictures' text is available (registering it on first use).
pub fn font_available() -> bool {
    font()
}

/// Registers the font once; `false` when none was found.
fn font() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!("no DejaVuSans.ttf in {FONT_PATHS:?} (apt-get install fonts-dejavu-core): plots skipped");
        false
    })
}

type Plot = Result<(), Box<dyn std::error::Error>>;

/// Three panels side by side: loss, accuracy and learning rate against the epoch number
/// (counted over both phases; the dashed line marks the start of phase 2).
pub fn learning_curves(history: &[Epoch], path: &Path) -> Plot {
    if !font() || history.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (1500, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let xs: Vec<f64> = (1..=history.len()).map(|i| i as f64).collect();
    let phase2 = history.iter().position(|e| e.phase == crate::checkpoint::Phase::FineTune).map(|i| i as f64 + 0.5);
    type Getter = fn(&Epoch) -> f64;
    type Series = Vec<(&'static str, Getter, RGBColor)>;
    let specs: [(&str, Series); 3] = [
        ("loss", vec![("train", |e| e.train_loss, BLUE), ("validation", |e| e.val_loss, RED)]),
        ("accuracy", vec![("train", |e| e.train_acc, BLUE), ("validation", |e| e.val_acc, RED)]),
        ("learning rate", vec![("lr", |e| e.lr, BLACK)]),
    ];
    for (area, (title, series)) in panels.iter().zip(specs) {
        let all: Vec<f64> = series.iter().flat_map(|(_, f, _)| history.iter().map(f)).collect();
        let (lo, hi) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let pad = ((hi - lo) * 0.05).max(1e-9);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.5..history.len() as f64 + 0.5, (lo - pad)..(hi + pad))?;
        chart.configure_mesh().x_desc("epoch").label_style(("sans-serif", 13)).draw()?;
        for (name, f, color) in series {
            chart
                .draw_series(LineSeries::new(xs.iter().zip(history).map(|(&x, e)| (x, f(e))), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        if let Some(x) = phase2 {
            chart.draw_series(DashedLineSeries::new(
                [(x, lo - pad), (x, hi + pad)],
                6,
                4,
                BLACK.mix(0.5).stroke_width(1),
            ))?;
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// The confusion matrix as a grid of counts, shaded by the share of each true class; `split`
/// names it in the title.
pub fn confusion(report: &Report, split: &str, path: &Path) -> Plot {
    if !font() {
        return Ok(());
    }
    let k = report.per_class.len();
    let cell = 110u32;
    let (left, top) = (130u32, 80u32);
    // Wide enough for the title whatever the number of classes.
    let width = (left + cell * k as u32 + 30).max(640);
    let root = BitMapBackend::new(path, (width, top + cell * k as u32 + 30)).into_drawing_area();
    root.fill(&WHITE)?;
    let text = |s: &str, x: u32, y: u32, size: u32| {
        Text::new(s.to_string(), (x as i32, y as i32), ("sans-serif", size).into_font())
    };
    root.draw(&text(
        &format!(
            "{split} accuracy {:.4}, macro-F1 {:.4} (rows: true, columns: predicted)",
            report.accuracy, report.macro_f1
        ),
        10,
        10,
        18,
    ))?;
    for (i, m) in report.per_class.iter().enumerate() {
        root.draw(&text(&m.class, left + i as u32 * cell + 10, top - 28, 16))?;
        root.draw(&text(&m.class, 10, top + i as u32 * cell + cell / 2 - 8, 16))?;
        let total: usize = report.confusion[i].iter().sum::<usize>().max(1);
        for (j, &v) in report.confusion[i].iter().enumerate() {
            let share = v as f64 / total as f64;
            let (x0, y0) = ((left + j as u32 * cell) as i32, (top + i as u32 * cell) as i32);
            let shade = RGBColor((255.0 * (1.0 - 0.75 * share)) as u8, (255.0 * (1.0 - 0.55 * share)) as u8, 255);
            root.draw(&Rectangle::new([(x0, y0), (x0 + cell as i32, y0 + cell as i32)], shade.filled()))?;
            root.draw(&Rectangle::new([(x0, y0), (x0 + cell as i32, y0 + cell as i32)], BLACK.stroke_width(1)))?;
            root.draw(&text(&v.to_string(), x0 as u32 + cell / 2 - 12, y0 as u32 + cell / 2 - 10, 20))?;
        }
    }
    root.present()?;
    Ok(())
}
