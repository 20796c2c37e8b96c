//! The classic transfer-learning head on top of Xception: global average pooling →
//! Dense(inner, relu) → Dropout → Dense(classes), giving logits.

use candle_core::{ModuleT, Result, Tensor};
use candle_nn::{linear, Linear, Module, VarBuilder};
use modelspec::Head;

/// Our tensor prefixes of the two Dense layers.
pub const DENSE: &str = "head_dense";
pub const LOGITS: &str = "head_logits";

/// The head: pooled features [N, 2048] → logits [N, classes].
#[derive(Debug, Clone)]
pub struct ClassifierHead {
    dense: Linear,
    logits: Linear,
    dropout: f32,
}

impl ClassifierHead {
    /// Builds the head from `head_dense.{weight,bias}` and `head_logits.{weight,bias}`.
    pub fn new(cfg: &Head, features: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dense: linear(features, cfg.inner, vb.pp(DENSE))?,
            logits: linear(cfg.inner, cfg.classes, vb.pp(LOGITS))?,
            dropout: cfg.dropout,
        })
    }
}

impl ClassifierHead {
    /// Training forward pass with an explicit dropout mask [N, inner] (0 or 1/(1-p) per unit),
    /// so that a seeded trainer is reproducible (Candle's own dropout draws from an unseeded RNG).
    pub fn forward_masked(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = self.dense.forward(x)?.relu()?;
        let x = match mask {
            Some(m) => x.mul(m)?,
            None => x,
        };
        self.logits.forward(&x)
    }
}

impl ModuleT for ClassifierHead {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.dense.forward(x)?.relu()?;
        let x = if train { candle_nn::ops::dropout(&x, self.dropout)? } else { x };
        self.logits.forward(&x)
    }
}
