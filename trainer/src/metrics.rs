//! Classification metrics: accuracy, per-class precision / recall / F1, macro-F1 and the
//! confusion matrix; printed as a table, saved as JSON and CSV.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Precision, recall and F1 of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub class: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

/// Metrics of one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    pub count: usize,
}

/// Computes the report from predicted and true labels.
pub fn evaluate(pred: &[u32], truth: &[u32], classes: &[String]) -> Report {
    let k = classes.len();
    let mut confusion = vec![vec![0usize; k]; k];
    for (&p, &t) in pred.iter().zip(truth) {
        confusion[t as usize][p as usize] += 1;
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_class: Vec<ClassMetrics> = (0..k)
        .map(|c| {
            let tp = confusion[c][c];
            let predicted: usize = (0..k).map(|t| confusion[t][c]).sum();
            let support: usize = confusion[c].iter().sum();
            let (precision, recall) = (ratio(tp, predicted), ratio(tp, support));
            let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
            ClassMetrics { class: classes[c].clone(), precision, recall, f1, support }
        })
        .collect();
    let correct: usize = (0..k).map(|c| confusion[c][c]).sum();
    let macro_f1 = if k == 0 { 0.0 } else { per_class.iter().map(|m| m.f1).sum::<f64>() / k as f64 };
    Report { accuracy: ratio(correct, pred.len()), macro_f1, per_class, confusion, count: pred.len() }
}

impl Report {
    /// A plain-text table: per-class figures, then the confusion matrix.
    pub fn table(&self) -> String {
        let mut s = format!("{:<12} {:>9} {:>9} {:>9} {:>8}\n", "class", "precision", "recall", "f1", "support");
        for m in &self.per_class {
            s += &format!("{:<12} {:>9.4} {:>9.4} {:>9.4} {:>8}\n", m.class, m.precision, m.recall, m.f1, m.support);
        }
        s += &format!("accuracy {:.4} ({} images), macro-F1 {:.4}\n", self.accuracy, self.count, self.macro_f1);
        s += &format!("confusion (rows: true, columns: predicted)\n{:<12}", "");
        for m in &self.per_class {
            s += &format!(" {:>8}", m.class);
        }
        for (m, row) in self.per_class.iter().zip(&self.confusion) {
            s += &format!("\n{:<12}", m.class);
            for v in row {
                s += &format!(" {v:>8}");
            }
        }
        s + "\n"
    }

    /// Writes the per-class figures as CSV.
    pub fn write_csv(&self, path: &Path) -> anyhow::Result<()> {
        let mut w = csv::Writer::from_path(path)?;
        w.write_record(["class", "precision", "recall", "f1", "support"])?;
        for m in &self.per_class {
            w.write_record([
                m.class.clone(),
                format!("{:.6}", m.precision),
                format!("{:.6}", m.recall),
                format!("{:.6}", m.f1),
                m.support.to_string(),
            ])?;
        }
        w.write_record([
            "macro".into(),
            String::new(),
            String::new(),
            format!("{:.6}", self.macro_f1),
            self.count.to_string(),
        ])?;
        w.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_example() {
        let classes: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        // truth a a a b, predicted a a b b: a: P 1, R 2/3; b: P 1/2, R 1.
        let r = evaluate(&[0, 0, 1, 1], &[0, 0, 0, 1], &classes);
        assert_eq!(r.confusion, vec![vec![2, 1], vec![0, 1]]);
        assert!((r.accuracy - 0.75).abs() < 1e-12);
        assert!((r.per_class[0].f1 - 0.8).abs() < 1e-12);
        assert!((r.per_class[1].f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.macro_f1 - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    }
}
