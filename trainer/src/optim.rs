//! AdamW and SGD with momentum, with their state exposed so that a checkpoint holds it and a
//! resumed run continues exactly where the killed one stopped (Candle's optimisers keep theirs
//! private).

use crate::config::OptimizerKind;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
/// Keras' Adam epsilon.
const EPS: f64 = 1e-7;

/// An optimiser over named variables.
pub struct Optimizer {
    kind: OptimizerKind,
    vars: Vec<(String, Var)>,
    /// AdamW: first moments; SGD: momentum buffers.
    m: Vec<Tensor>,
    /// AdamW: second moments (unused by SGD).
    v: Vec<Tensor>,
    pub step: u64,
    weight_decay: f64,
    momentum: f64,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, vars: Vec<(String, Var)>, weight_decay: f64, momentum: f64) -> Result<Self> {
        let zeros =
            |vars: &[(String, Var)]| vars.iter().map(|(_, v)| v.as_tensor().zeros_like()).collect::<Result<Vec<_>>>();
        Ok(Self { kind, m: zeros(&vars)?, v: zeros(&vars)?, vars, step: 0, weight_decay, momentum })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with learning rate `lr`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            // Detached: otherwise the moments would hold on to this step's autograd graph, and
            // through it to every earlier one.
            let (g, theta) = (&g.detach(), &var.as_tensor().detach());
            match self.kind {
                OptimizerKind::Adamw => {
                    let m = ((&self.m[i] * BETA1)? + (g * (1.0 - BETA1))?)?;
                    let v = ((&self.v[i] * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
                    let mhat = (&m / (1.0 - BETA1.powi(t)))?;
                    let vhat = (&v / (1.0 - BETA2.powi(t)))?;
                    let update = (mhat / (vhat.sqrt()? + EPS)?)?;
                    let decayed = (theta * (1.0 - lr * self.weight_decay))?;
                    var.set(&(decayed - (update * lr)?)?)?;
                    self.m[i] = m.detach();
                    self.v[i] = v.detach();
                }
                OptimizerKind::Sgd => {
                    let g = (g + (theta * self.weight_decay)?)?;
                    let buf = ((&self.m[i] * self.momentum)? + g)?;
                    var.set(&(theta - (&buf * lr)?)?)?;
                    self.m[i] = buf.detach();
                }
            }
        }
        Ok(())
    }

    /// The optimiser's state as named tensors (for checkpoints).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("m.{name}"), self.m[i].clone()));
            out.push((format!("v.{name}"), self.v[i].clone()));
        }
        out
    }

    /// Restores [`Optimizer::state`]; `get` returns the saved tensor of a name.
    pub fn load_state(&mut self, step: u64, get: impl Fn(&str) -> Option<Tensor>) -> Result<()> {
        for (i, (name, _)) in self.vars.iter().enumerate() {
            let m = get(&format!("m.{name}"));
            let v = get(&format!("v.{name}"));
            match (m, v) {
                (Some(m), Some(v)) => {
                    self.m[i] = m.detach();
                    self.v[i] = v.detach();
                }
                _ => candle_core::bail!("checkpoint has no optimiser state for `{name}`"),
            }
        }
        self.step = step;
        Ok(())
    }
}
