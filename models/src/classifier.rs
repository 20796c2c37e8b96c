//! The whole classifier: the Xception base and the head, built from a model directory.

use crate::error::Result;
use crate::head::ClassifierHead;
use crate::layers;
use crate::weights::ModelDir;
use crate::xception::{global_avg_pool, Xception, XceptionOptions};
use candle_core::{Device, ModuleT, Tensor};
use candle_nn::VarBuilder;
use modelspec::ModelDescription;
use std::path::Path;

/// Xception + head: [N, H, W, 3] in [-1, 1] → logits [N, classes] (or pooled features
/// [N, 2048] when the model has no head).
#[derive(Debug, Clone)]
pub struct Classifier {
    pub base: Xception,
    pub head: Option<ClassifierHead>,
}

impl Classifier {
    /// Builds the model that `desc` describes from tensors named as in [`crate::weights`].
    pub fn new(desc: &ModelDescription, vb: VarBuilder, opts: XceptionOptions) -> Result<Self> {
        let base = Xception::new(vb.clone(), opts)?;
        let head = desc.head.as_ref().map(|h| ClassifierHead::new(h, layers::FEATURES, vb)).transpose()?;
        Ok(Self { base, head })
    }

    /// Loads a model directory for inference.
    pub fn load(dir: &Path, dev: &Device) -> Result<(Self, ModelDescription)> {
        let m = ModelDir::load(dir, dev)?;
        let model = Self::new(&m.description, m.var_builder(dev), XceptionOptions::default())?;
        Ok((model, m.description))
    }

    /// Pooled features [N, 2048].
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        Ok(global_avg_pool(&self.base.forward_with_taps(x, &mut |_, _| {})?)?)
    }
}

impl ModuleT for Classifier {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let f = self.features(x).map_err(candle_core::Error::wrap)?;
        match &self.head {
            Some(h) => h.forward_t(&f, train),
            None => Ok(f),
        }
    }
}
