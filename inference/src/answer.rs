//! From probabilities to an answer: the top class, its confidence, the top k, and `unknown`
//! below a confidence threshold.

use serde::Serialize;

/// The label given when the top probability is below the threshold.
pub const UNKNOWN: &str = "unknown";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    pub label: String,
    pub probability: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    /// The top class, or `unknown` when its probability is below the threshold.
    pub label: String,
    /// Probability of the top class.
    pub confidence: f32,
    /// The `k` most probable classes, most probable first.
    pub top_k: Vec<Ranked>,
}

/// The answer for one image's probabilities.
pub fn answer(probabilities: &[f32], classes: &[String], k: usize, threshold: f32) -> Answer {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]).then(a.cmp(&b)));
    let name = |i: usize| classes.get(i).cloned().unwrap_or_else(|| i.to_string());
    let top_k: Vec<Ranked> =
        order.iter().take(k.max(1)).map(|&i| Ranked { label: name(i), probability: probabilities[i] }).collect();
    let confidence = top_k.first().map(|r| r.probability).unwrap_or(0.0);
    let label = if confidence < threshold { UNKNOWN.to_string() } else { top_k[0].label.clone() };
    Answer { label, confidence, top_k }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_thresholds() {
        let classes: Vec<String> = ["boot", "sandal", "shoe"].map(String::from).to_vec();
        let a = answer(&[0.1, 0.7, 0.2], &classes, 2, 0.5);
        assert_eq!(a.label, "sandal");
        assert_eq!(a.confidence, 0.7);
        assert_eq!(a.top_k.iter().map(|r| r.label.as_str()).collect::<Vec<_>>(), ["sandal", "shoe"]);
        assert_eq!(answer(&[0.4, 0.35, 0.25], &classes, 3, 0.5).label, UNKNOWN);
    }
}
