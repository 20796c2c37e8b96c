//! Accuracy and macro-F1 of model files on one labelled folder (`FOLDER/<class>/...`) through
//! ONNX Runtime, and how often each file's top class equals the first file's: float32 against
//! int8 files, ours against onnxruntime's own quantizer, on the same photos.
//!
//!   cargo run --release -p inference --example accuracy -- FOLDER model.onnx model.int8.onnx ...

use inference::batch::predict_files;
use inference::evaluate::scores;
use inference::{OnnxModel, SessionConfig};
use modelspec::preprocess::image_files;
use std::collections::HashMap;
use std::path::PathBuf;

fn main() {
    let args: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    assert!(args.len() >= 2, "usage: accuracy FOLDER FILE...");
    let (folder, files) = (&args[0], &args[1..]);
    let cfg = SessionConfig::default();
    let mut first: Option<HashMap<PathBuf, usize>> = None;
    println!("| file | precision | photos | accuracy | macro-F1 | same top class as the first |");
    println!("|---|---|---|---|---|---|");
    for f in files {
        let mut m = OnnxModel::load(f, &cfg).expect("loads");
        let classes = m.classes().to_vec();
        let mut photos = Vec::new();
        for (label, c) in classes.iter().enumerate() {
            photos.extend(image_files(&folder.join(c)).expect("class folder").into_iter().map(|p| (p, label)));
        }
        let paths: Vec<PathBuf> = photos.iter().map(|(p, _)| p.clone()).collect();
        let r = predict_files(&mut m, &paths, 32).expect("runs");
        let pred: HashMap<PathBuf, usize> =
            r.predicted.into_iter().map(|(p, x)| (p, x.top_class().unwrap_or(0))).collect();
        let (mut predicted, mut truth) = (Vec::new(), Vec::new());
        for (p, t) in &photos {
            if let Some(&y) = pred.get(p) {
                predicted.push(y);
                truth.push(*t);
            }
        }
        let sc = scores(&predicted, &truth, classes.len());
        let same = match &first {
            None => "-".to_string(),
            Some(base) => {
                let s = pred.iter().filter(|(p, y)| base.get(*p) == Some(*y)).count();
                format!("{:.2}%", 100.0 * s as f64 / pred.len().max(1) as f64)
            }
        };
        println!(
            "| {} | {} | {} | {:.2}% ({}) | {:.4} | {same} |",
            f.display(),
            m.info.precision,
            predicted.len(),
            100.0 * sc.accuracy,
            sc.correct,
            sc.macro_f1
        );
        if first.is_none() {
            first = Some(pred);
        }
    }
}
