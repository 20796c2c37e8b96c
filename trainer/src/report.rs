//! The run's report, for a person to look at: `report.html` in the run directory (the data as
//! found, the settings chosen, the learning curves, per-class precision / recall / F1 and the
//! confusion matrices, the leaks between splits) and contact sheets of the photos the model gets
//! wrong (`errors_validation.png`, `errors_test.png`), most confident mistakes first, each with
//! its true class, the predicted class and the confidence: fastai's "top losses" as a picture.
//! `trainer eval --errors` draws the same sheet for any folder.

use crate::config::TrainConfig;
use crate::data::Dataset;
use crate::history::Epoch;
use crate::leaks::{Leak, LeakKind};
use crate::metrics::Report;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Most photos on one contact sheet.
pub const SHEET_MAX: usize = 60;
/// Side of a photo on the sheet, pixels.
const THUMB: u32 = 150;
/// Height of the caption under each photo.
const CAPTION: u32 = 52;
const COLUMNS: u32 = 6;
const GAP: u32 = 8;
const TITLE: u32 = 40;

/// A photo predicted wrong.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Mistake {
    pub path: PathBuf,
    pub truth: String,
    pub predicted: String,
    /// Probability of the predicted class.
    pub confidence: f32,
}

/// The mistakes among `paths` (true `labels`, predicted `pred`, class `probs`), most confident
/// first (ties by path).
pub fn mistakes(
    paths: &[PathBuf],
    labels: &[u32],
    pred: &[u32],
    probs: &[Vec<f32>],
    classes: &[String],
) -> Vec<Mistake> {
    let mut v: Vec<Mistake> = paths
        .iter()
        .zip(labels.iter().zip(pred))
        .zip(probs)
        .filter(|((_, (t, p)), _)| t != p)
        .map(|((path, (&t, &p)), pr)| Mistake {
            path: path.clone(),
            truth: classes[t as usize].clone(),
            predicted: classes[p as usize].clone(),
            confidence: pr.get(p as usize).copied().unwrap_or(0.0),
        })
        .collect();
    v.sort_by(|a, b| b.confidence.total_cmp(&a.confidence).then_with(|| a.path.cmp(&b.path)));
    v
}

/// Draws the first [`SHEET_MAX`] mistakes as a grid of photos (fitted inside a square, shape
/// kept) with their captions. Nothing is written when the font for the text is missing (a
/// warning says so) or there is no mistake; unreadable photos are drawn as grey squares.
pub fn contact_sheet(mistakes: &[Mistake], title: &str, path: &Path) -> anyhow::Result<bool> {
    if mistakes.is_empty() || !crate::plots::font_available() {
        return Ok(false);
    }
    let shown = &mistakes[..mistakes.len().min(SHEET_MAX)];
    let rows = (shown.len() as u32).div_ceil(COLUMNS);
    let cell_h = THUMB + CAPTION + GAP;
    let (w, h) = (COLUMNS * (THUMB + GAP) + GAP, TITLE + rows * cell_h + GAP);
    let mut canvas = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let limits = modelspec::preprocess::DecodeLimits::default();
    for (k, m) in shown.iter().enumerate() {
        let (col, row) = (k as u32 % COLUMNS, k as u32 / COLUMNS);
        let (x0, y0) = (GAP + col * (THUMB + GAP), TITLE + row * cell_h);
        let photo = modelspec::preprocess::decode_file(&m.path, &limits).ok().map(|img| fit_inside(&img, THUMB));
        let tile = photo.unwrap_or_else(|| image::RgbImage::from_pixel(THUMB, THUMB, image::Rgb([200, 200, 200])));
        let (dx, dy) = ((THUMB - tile.width()) / 2, (THUMB - tile.height()) / 2);
        image::imageops::overlay(&mut canvas, &tile, i64::from(x0 + dx), i64::from(y0 + dy));
    }
    {
        let root = BitMapBackend::with_buffer(canvas.as_mut(), (w, h)).into_drawing_area();
        let text = |s: &str, x: u32, y: u32, size: u32, color: RGBColor| {
            Text::new(s.to_string(), (x as i32, y as i32), ("sans-serif", size).into_font().color(&color))
        };
        let more = if mistakes.len() > shown.len() {
            format!(" (the {} most confident of {})", shown.len(), mistakes.len())
        } else {
            String::new()
        };
        root.draw(&text(&format!("{title}: {} wrong{more}, most confident first", mistakes.len()), GAP, 10, 20, BLACK))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (k, m) in shown.iter().enumerate() {
            let (col, row) = (k as u32 % COLUMNS, k as u32 / COLUMNS);
            let (x0, y0) = (GAP + col * (THUMB + GAP), TITLE + row * cell_h + THUMB + 4);
            let name = m.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let lines = [
                (format!("{} -> {}", m.truth, m.predicted), RGBColor(170, 0, 0), 14),
                (format!("{:.1}% sure", 100.0 * m.confidence), BLACK, 13),
                (shorten(&name, 24), RGBColor(90, 90, 90), 11),
            ];
            for (i, (s, color, size)) in lines.iter().enumerate() {
                root.draw(&text(s, x0, y0 + i as u32 * 16, *size, *color)).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    canvas.save(path).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(true)
}

/// `s` cut to `max` characters with an ellipsis in the middle.
fn shorten(s: &str, max: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= max {
        return s.to_string();
    }
    let half = (max - 3) / 2;
    format!("{}...{}", chars[..half].iter().collect::<String>(), chars[chars.len() - half..].iter().collect::<String>())
}

/// `img` shrunk (or grown) to fit a square of `side`, its shape kept.
fn fit_inside(img: &image::RgbImage, side: u32) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let scale = f64::from(side) / f64::from(w.max(h).max(1));
    let (nw, nh) = (
        ((f64::from(w) * scale).round() as u32).clamp(1, side),
        ((f64::from(h) * scale).round() as u32).clamp(1, side),
    );
    image::imageops::thumbnail(img, nw, nh)
}

/// What the report of a finished run shows.
pub struct RunReport<'a> {
    pub cfg: &'a TrainConfig,
    pub dataset: &'a Dataset,
    pub history: &'a [Epoch],
    pub validation: &'a Report,
    pub test: Option<&'a Report>,
    /// Validation's and test's mistakes, most confident first.
    pub mistakes: [&'a [Mistake]; 2],
    pub leaks: &'a [Leak],
    pub skipped: &'a [(PathBuf, String)],
}

/// Text made safe for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn metrics_table(r: &Report) -> String {
    let mut s =
        String::from("<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>photos</th></tr>");
    for m in &r.per_class {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{}</td></tr>",
            esc(&m.class),
            m.precision,
            m.recall,
            m.f1,
            m.support
        );
    }
    let _ = write!(
        s,
        "<tr><th>all</th><td colspan=3>accuracy {:.4}, macro-F1 {:.4}</td><td>{}</td></tr></table>",
        r.accuracy, r.macro_f1, r.count
    );
    s += "<table><tr><th>true \\ predicted</th>";
    for m in &r.per_class {
        let _ = write!(s, "<th>{}</th>", esc(&m.class));
    }
    s += "</tr>";
    for (m, row) in r.per_class.iter().zip(&r.confusion) {
        let _ = write!(s, "<tr><th>{}</th>", esc(&m.class));
        for v in row {
            let _ = write!(s, "<td>{v}</td>");
        }
        s += "</tr>";
    }
    s + "</table>"
}

/// Writes `report.html` and the contact sheets into `out`.
pub fn write(out: &Path, r: &RunReport) -> anyhow::Result<()> {
    let mut sheets = Vec::new();
    for (name, m) in [("validation", r.mistakes[0]), ("test", r.mistakes[1])] {
        let file = format!("errors_{name}.png");
        if contact_sheet(m, &format!("{} {name}", r.cfg.name), &out.join(&file))? {
            sheets.push((name, file));
        }
    }
    let cfg = r.cfg;
    let ds = r.dataset;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=utf-8><title>{name}: training report</title><style>\
         body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}\
         table{{border-collapse:collapse;margin:0.6em 1.5em 0.6em 0;display:inline-table;vertical-align:top}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} th{{background:#f3f3f3}}\
         img{{max-width:100%;border:1px solid #ddd}} .warn{{color:#a00}} code{{background:#f3f3f3}}</style></head><body>\
         <h1>{name}</h1><p>Trained on <code>{data}</code>: {layout}; {size} px, photos {fit}.</p>",
        name = esc(&cfg.name),
        data = esc(&cfg.data.display().to_string()),
        layout = esc(&ds.layout.to_string()),
        size = cfg.image_size,
        fit = match cfg.resize {
            modelspec::Fit::Stretch => "stretched to the square",
            modelspec::Fit::Crop => "cropped to their centre square",
        },
    );
    // The data.
    h += "<h2>Photos</h2><table><tr><th>class</th><th>train</th><th>validation</th><th>test</th></tr>";
    let counts = ds.counts();
    for (c, class) in ds.classes.iter().enumerate() {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(class),
            counts[0][c],
            counts[1][c],
            counts[2][c]
        );
    }
    let _ = write!(
        h,
        "</table><p>Splits: {} (every photo's split is in <code>splits.csv</code>).</p>",
        ds.origins
            .iter()
            .zip(crate::data::SPLITS)
            .enumerate()
            .map(|(i, (o, s))| if i == 2 && !ds.has_test() { "no test split".to_string() } else { format!("{s} {o}") })
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !ds.ignored.is_empty() {
        let _ = write!(h, "<p class=warn>Not read (not JPEG, PNG or WebP): {}</p>", list(&ds.ignored));
    }
    if !r.skipped.is_empty() {
        let names: Vec<String> = r.skipped.iter().map(|(p, why)| format!("{}: {why}", p.display())).collect();
        let _ = write!(h, "<p class=warn>Unreadable, skipped: {}</p>", esc(&names.join("; ")));
    }
    // Settings.
    let phase2 = if cfg.fine_tunes() {
        format!(
            "Phase 2 (blocks {}-14): {} epochs at most, patience {}, warm-up {}, weight average {}.",
            cfg.fine_tune_from,
            cfg.fine_tune.epochs,
            cfg.fine_tune.patience,
            cfg.fine_tune.warmup_epochs,
            cfg.fine_tune.ema
        )
    } else {
        "Phase 2: off.".to_string()
    };
    let _ = write!(
        h,
        "<h2>Settings</h2><p>Phase 1 (the head): {} epochs at most, patience {}. {phase2} {} cached variants per \
         training photo. Class weights: {}. Everything is in <code>config.toml</code>.</p>",
        cfg.head.epochs,
        cfg.head.patience,
        cfg.variants,
        match cfg.class_weights {
            crate::config::ClassWeights::On => "on (the best epoch chosen on macro-F1)",
            _ => "off",
        }
    );
    if !r.history.is_empty() {
        h += "<h2>Learning curves</h2><img src=learning_curves.png alt='learning curves'>";
    }
    // Figures.
    h += "<h2>Figures</h2>";
    match r.test {
        Some(t) => {
            let _ = write!(h, "<h3>Test (the final figure)</h3>{}<br><img src=confusion_test.png>", metrics_table(t));
        }
        None if ds.has_test() => h += "<p>Test split not evaluated (<code>--skip-test</code>).</p>",
        None => {
            h += "<p class=warn>No test split: validation's figure is the final one, and validation also chose the \
                  epochs, so it is optimistic.</p>"
        }
    }
    let _ = write!(h, "<h3>Validation</h3>{}<br><img src=confusion_validation.png>", metrics_table(r.validation));
    // Leaks.
    h += "<h2>Leaks between splits</h2>";
    if r.leaks.is_empty() {
        let _ = write!(
            h,
            "<p>None: no validation or test photo is identical to, or has features with a cosine similarity of {} or \
             more to, a photo of an earlier split.</p>",
            cfg.near_duplicate
        );
    } else {
        h += "<table><tr><th>photo</th><th>split</th><th>same as</th><th>split</th><th>how</th></tr>";
        for l in r.leaks {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&l.photo.display().to_string()),
                l.split,
                esc(&l.twin.display().to_string()),
                l.twin_split,
                match l.kind {
                    LeakKind::Identical => "identical bytes".to_string(),
                    LeakKind::Near => format!("similarity {:.3}", l.similarity),
                }
            );
        }
        h += "</table>";
    }
    // Mistakes.
    h += "<h2>Photos it gets wrong</h2>";
    if sheets.is_empty() {
        h += "<p>None on validation or test.</p>";
    }
    for (name, file) in sheets {
        let _ = write!(h, "<h3>{name}</h3><img src={file} alt='{name} errors'>");
    }
    h += "</body></html>\n";
    let path = out.join("report.html");
    std::fs::write(&path, h).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

fn list(paths: &[PathBuf]) -> String {
    esc(&paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistakes_are_the_wrong_ones_most_confident_first() {
        let classes = vec!["a".to_string(), "b".to_string()];
        let paths: Vec<PathBuf> = ["p0", "p1", "p2", "p3"].iter().map(PathBuf::from).collect();
        let labels = [0, 0, 1, 1];
        let pred = [0, 1, 0, 0];
        let probs = vec![vec![0.9, 0.1], vec![0.4, 0.6], vec![0.95, 0.05], vec![0.7, 0.3]];
        let m = mistakes(&paths, &labels, &pred, &probs, &classes);
        let got: Vec<(&str, &str, &str, f32)> = m
            .iter()
            .map(|m| (m.path.to_str().unwrap(), m.truth.as_str(), m.predicted.as_str(), m.confidence))
            .collect();
        assert_eq!(got, vec![("p2", "b", "a", 0.95), ("p3", "b", "a", 0.7), ("p1", "a", "b", 0.6)]);
        assert_eq!(shorten("abcdefghij", 7), "ab...ij");
        assert_eq!(esc("<a & \"b\">"), "&lt;a &amp; &quot;b&quot;&gt;");
    }
}
