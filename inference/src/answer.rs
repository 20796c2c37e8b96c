//! From a prediction to an answer: the top class, its confidence, the top k, and `unknown`
//! below a confidence threshold or, in files with the out-of-distribution output, when the image
//! scores beyond the file's threshold (it does not look like any class's training photos).

use serde::Serialize;

/// The label given when the top probability is below the threshold, or the image is out of
/// distribution.
pub const UNKNOWN: &str = "unknown";
/// [`Answer::reason`] of an image beyond the out-of-distribution threshold.
pub const OUT_OF_DISTRIBUTION: &str = "out_of_distribution";
/// [`Answer::reason`] of an image whose top probability is below `--threshold`.
pub const LOW_CONFIDENCE: &str = "low_confidence";

/// An image's out-of-distribution score and the file's threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OodCheck {
    pub score: f32,
    pub threshold: f32,
}

impl OodCheck {
    /// The check of a prediction under the model's threshold, when both exist and it is on.
    pub fn of(score: Option<f32>, meta: Option<&modelspec::onnx_meta::OodMeta>, on: bool) -> Option<Self> {
        match (score, meta, on) {
            (Some(score), Some(m), true) => Some(Self { score, threshold: m.threshold }),
            _ => None,
        }
    }

    /// Beyond the threshold (a score that is not a number counts as beyond: it is no photo the
    /// model knows).
    pub fn rejects(&self) -> bool {
        self.score.is_nan() || self.score > self.threshold
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    pub label: String,
    pub probability: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    /// The top class, or `unknown` when the image is out of distribution or its probability is
    /// below the threshold.
    pub label: String,
    /// Probability of the top class.
    pub confidence: f32,
    /// The `k` most probable classes, most probable first (the first is the best class, even
    /// when the label is `unknown`).
    pub top_k: Vec<Ranked>,
    /// Why the label is `unknown`: [`OUT_OF_DISTRIBUTION`] or [`LOW_CONFIDENCE`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The image's out-of-distribution score, in files that have it (unless turned off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ood_score: Option<f32>,
    /// The file's threshold on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ood_threshold: Option<f32>,
}

/// The answer for one image's probabilities and, where the file has it, its out-of-distribution
/// check (which comes first: an image that looks like no class gets no class, however sure).
pub fn answer(probabilities: &[f32], classes: &[String], k: usize, threshold: f32, ood: Option<OodCheck>) -> Answer {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]).then(a.cmp(&b)));
    let name = |i: usize| classes.get(i).cloned().unwrap_or_else(|| i.to_string());
    let top_k: Vec<Ranked> =
        order.iter().take(k.max(1)).map(|&i| Ranked { label: name(i), probability: probabilities[i] }).collect();
    let confidence = top_k.first().map(|r| r.probability).unwrap_or(0.0);
    let reason = if ood.is_some_and(|o| o.rejects()) {
        Some(OUT_OF_DISTRIBUTION)
    } else if confidence < threshold {
        Some(LOW_CONFIDENCE)
    } else {
        None
    };
    let label = if reason.is_some() { UNKNOWN.to_string() } else { top_k[0].label.clone() };
    Answer {
        label,
        confidence,
        top_k,
        reason,
        ood_score: ood.map(|o| o.score),
        ood_threshold: ood.map(|o| o.threshold),
    }
}

/// "a boot, a sandal or a shoe" for classes boot, sandal, shoe.
pub fn class_list(classes: &[String]) -> String {
    let a: Vec<String> = classes.iter().map(|c| format!("{} {c}", article(c))).collect();
    match a.as_slice() {
        [] => "any class".into(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u', 'A', 'E', 'I', 'O', 'U']) {
        "an"
    } else {
        "a"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_thresholds() {
        let classes: Vec<String> = ["boot", "sandal", "shoe"].map(String::from).to_vec();
        let a = answer(&[0.1, 0.7, 0.2], &classes, 2, 0.5, None);
        assert_eq!(a.label, "sandal");
        assert_eq!(a.confidence, 0.7);
        assert_eq!(a.top_k.iter().map(|r| r.label.as_str()).collect::<Vec<_>>(), ["sandal", "shoe"]);
        assert_eq!(a.reason, None);
        let low = answer(&[0.4, 0.35, 0.25], &classes, 3, 0.5, None);
        assert_eq!((low.label.as_str(), low.reason), (UNKNOWN, Some(LOW_CONFIDENCE)));
        // Beyond the threshold: unknown, however sure, with the best class still ranked first.
        let far = answer(&[0.05, 0.9, 0.05], &classes, 1, 0.5, Some(OodCheck { score: 9.0, threshold: 4.8 }));
        assert_eq!((far.label.as_str(), far.reason), (UNKNOWN, Some(OUT_OF_DISTRIBUTION)));
        assert_eq!((far.top_k[0].label.as_str(), far.ood_score, far.ood_threshold), ("sandal", Some(9.0), Some(4.8)));
        let near = answer(&[0.05, 0.9, 0.05], &classes, 1, 0.5, Some(OodCheck { score: 4.8, threshold: 4.8 }));
        assert_eq!((near.label.as_str(), near.reason), ("sandal", None));
        assert!(OodCheck { score: f32::NAN, threshold: 4.8 }.rejects());
        let json = serde_json::to_value(&a).unwrap();
        assert!(json.get("reason").is_none() && json.get("ood_score").is_none(), "{json}");
        assert_eq!(class_list(&classes), "a boot, a sandal or a shoe");
        assert_eq!(class_list(&["ants".into(), "bees".into()]), "an ants or a bees");
    }
}
