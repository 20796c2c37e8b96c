//! int8 files: the float graph of [`crate::build`] in ONNX's QDQ form, the form ONNX Runtime
//! fuses into its integer kernels (`QLinearConv`, `QLinearAdd`, `QGemm`, uint8 `MaxPool`).
//!
//! - Weights of every `Conv` and `Gemm`: int8, symmetric, one scale per output channel
//!   (`DequantizeLinear` with `axis = 0`); biases int32 with scale `s_input · s_weight[c]`, as
//!   ONNX Runtime's fused kernels take them. By default the weights use 7 bits (−63..63): on x86
//!   CPUs without VNNI, ONNX Runtime's uint8 × int8 matrix kernels add pairs of products in 16
//!   bits (`vpmaddubsw`), which saturate with full-range weights (255 · 127 · 2 > 32,767) and
//!   wreck the results (39% accuracy measured on the footwear model, docs/benchmarks.md); 8 bits
//!   (−127..127) are for files that only ever run on CPUs with VNNI. (Its depthwise kernels
//!   widen to 16 bits first and could keep 8 bits; measured on validation, 8-bit depthwise
//!   weights were no better: 98.56% against 98.61% for 7 bits everywhere.)
//! - Activations: uint8, asymmetric, one scale per tensor, from value ranges calibrated on
//!   photos (by the caller, through the Candle network's taps): a `QuantizeLinear` →
//!   `DequantizeLinear` pair after every activation that a quantized operator reads or writes.
//!   The range of each activation comes from the Candle tap of the same value
//!   ([`RangeSource`]); a ReLU's from its input's, a max-pool keeps its input's quantization
//!   (ONNX Runtime then pools the uint8 values as they are).
//! - Layers named in `keep_float` keep float weights and read float activations, so that
//!   ONNX Runtime runs them in float (it would quantize a float convolution's weights itself if
//!   its input came from a `DequantizeLinear`); their outputs are still quantized for the next
//!   layer.

use crate::{build_with_ranges, int, GraphError, OnnxPrecision, Weights};
use candle_onnx::onnx::{tensor_proto::DataType, ModelProto, NodeProto, TensorProto};
use modelspec::onnx_meta::InputType;
use modelspec::ModelDescription;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Largest |bias| stored, in units of its scale (int32, with a margin).
const BIAS_LIMIT: f32 = (1u32 << 30) as f32;

/// Bits of the int8 weights that run correctly on every x86 CPU (see the module's doc).
pub const PORTABLE_WEIGHT_BITS: u8 = 7;

/// Tap name of the pooled features (the head's input), which the Candle base has no tap for.
pub const POOLED_TAP: &str = "avg_pool";
/// Tap name of the head's hidden layer after its ReLU.
pub const DENSE_TAP: &str = "head_dense_act";

/// Where the value range of an activation of the graph comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum RangeSource {
    /// The calibrated range of this Candle tap.
    Tap(String),
    /// A ReLU of that graph tensor: `[0, max]` of its range.
    Relu(String),
    /// The same quantization as that graph tensor.
    Same(String),
    /// Known without calibration (the scaled input).
    Fixed(f32, f32),
}

/// Calibrated `(min, max)` of each Candle tap.
pub type TapRanges = HashMap<String, (f32, f32)>;

/// What an int8 graph was made of.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Int8Summary {
    /// Convolutions and dense layers with int8 weights.
    pub quantized: usize,
    /// Layers left in float (`keep_float`).
    pub kept_float: Vec<String>,
    /// Activations with a uint8 quantize/dequantize pair.
    pub activations: usize,
    /// Bias values beyond int32 at their scale, clamped (0 in any sane model).
    pub biases_clamped: usize,
}

/// uint8 quantization of one activation: `x ≈ scale · (q − zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: u8,
}

impl QParams {
    /// The affine uint8 quantization covering `[lo, hi]` and zero (which must stay exact).
    pub fn covering(lo: f32, hi: f32) -> Self {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let span = (hi - lo).max(1e-8);
        let scale = span / 255.0;
        let zero_point = (-lo / scale).round().clamp(0.0, 255.0) as u8;
        Self { scale, zero_point }
    }
}

/// The int8 QDQ model of `desc`; `ranges` gives the calibrated range of every tap the graph
/// needs, `keep_float` the layers (a convolution's or dense layer's name, e.g. `block1_conv1`,
/// `block14_sepconv2`, `head_logits`) that keep float weights, `weight_bits` (7 or 8) the range
/// of the int8 weights.
#[allow(clippy::too_many_arguments)]
pub fn build_int8(
    desc: &ModelDescription,
    w: &Weights,
    input_type: InputType,
    props: &[(String, String)],
    model_version: i64,
    producer: (&str, &str),
    ranges: &TapRanges,
    keep_float: &HashSet<String>,
    weight_bits: u8,
) -> Result<(ModelProto, Int8Summary), GraphError> {
    if !(2..=8).contains(&weight_bits) {
        return Err(GraphError(format!("int8 weights: {weight_bits} bits is not within 2..=8")));
    }
    let qmax = ((1u32 << (weight_bits - 1)) - 1) as f32;
    let (mut model, sources) =
        build_with_ranges(desc, w, OnnxPrecision::F32, input_type, props, model_version, producer)?;
    // Every activation's range, in graph order (a ReLU's or a pool's refers to an earlier one).
    let mut resolved: HashMap<String, (f32, f32)> = HashMap::new();
    for (tensor, source) in &sources {
        let r = match source {
            RangeSource::Tap(t) => {
                *ranges.get(t).ok_or_else(|| GraphError(format!("no calibrated range for `{t}`")))?
            }
            RangeSource::Relu(x) => (0.0, resolved[x].1.max(0.0)),
            RangeSource::Same(x) => resolved[x],
            RangeSource::Fixed(lo, hi) => (*lo, *hi),
        };
        if !(r.0.is_finite() && r.1.is_finite()) {
            return Err(GraphError(format!("the range of `{tensor}` is not finite: {r:?}")));
        }
        resolved.insert(tensor.clone(), r);
    }
    let qparams: HashMap<String, QParams> =
        resolved.iter().map(|(t, (lo, hi))| (t.clone(), QParams::covering(*lo, *hi))).collect();
    let known_layers: HashSet<String> = model
        .graph
        .iter()
        .flat_map(|g| &g.node)
        .filter(|n| matches!(n.op_type.as_str(), "Conv" | "Gemm"))
        .map(|n| layer_of(&n.name).to_string())
        .collect();
    for k in keep_float {
        if !known_layers.contains(k) {
            return Err(GraphError(format!(
                "--keep-float: no layer `{k}` (layers are named as block1_conv1, block14_sepconv2, head_logits)"
            )));
        }
    }

    let graph = model.graph.as_mut().expect("built with a graph");
    let mut inits: BTreeMap<String, TensorProto> =
        std::mem::take(&mut graph.initializer).into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut nodes = Vec::with_capacity(graph.node.len() * 3);
    let mut summary = Int8Summary::default();
    let mut replaced = HashSet::new();
    // The scale and zero point of each activation, as initializers.
    for (t, q) in &qparams {
        inits.insert(format!("{t}/scale"), scalar_f32(&format!("{t}/scale"), q.scale));
        inits.insert(
            format!("{t}/zero_point"),
            tensor(&format!("{t}/zero_point"), &[], DataType::Uint8, vec![q.zero_point]),
        );
    }
    for mut n in std::mem::take(&mut graph.node) {
        let layer = layer_of(&n.name).to_string();
        let weighted = matches!(n.op_type.as_str(), "Conv" | "Gemm") && n.input.len() >= 2;
        if weighted && keep_float.contains(&layer) {
            if !summary.kept_float.contains(&layer) {
                summary.kept_float.push(layer.clone());
            }
        } else if weighted && qparams.contains_key(&n.input[0]) {
            let s_x = qparams[&n.input[0]].scale;
            let wname = n.input[1].clone();
            let wt = inits.get(&wname).ok_or_else(|| GraphError(format!("no initializer `{wname}`")))?;
            let (dims, values) = (wt.dims.clone(), f32_values(wt)?);
            let channels = dims[0] as usize;
            let per = values.len() / channels.max(1);
            let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
                Some(b) => Some(f32_values(inits.get(b).ok_or_else(|| GraphError(format!("no initializer `{b}`")))?)?),
                None => None,
            };
            let mut scales = Vec::with_capacity(channels);
            let mut q = Vec::with_capacity(values.len());
            for c in 0..channels {
                let v = &values[c * per..(c + 1) * per];
                let m = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                // The bias is stored as int32 at scale s_x · s: a channel of tiny weights and a
                // large bias widens its weight scale until the bias fits (as onnxruntime's own
                // quantizer does).
                let for_bias = bias.as_ref().map_or(0.0, |b| b[c].abs() / (s_x * BIAS_LIMIT));
                let s = (m / qmax).max(for_bias);
                let s = if s > 0.0 { s } else { 1.0 };
                scales.push(s);
                q.extend(v.iter().map(|x| (x / s).round().clamp(-qmax, qmax) as i8 as u8));
            }
            let dims_u: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
            let wq = format!("{wname}/int8");
            inits.insert(wq.clone(), tensor(&wq, &dims_u, DataType::Int8, q));
            inits.insert(format!("{wname}/scale"), vec_f32(&format!("{wname}/scale"), &scales));
            inits.insert(
                format!("{wname}/zero_point"),
                tensor(&format!("{wname}/zero_point"), &[channels], DataType::Int8, vec![0; channels]),
            );
            nodes.push(dequantize(&format!("{wname}/dq"), &wq, &wname, Some(0)));
            replaced.insert(wname.clone());
            n.input[1] = format!("{wname}/dq");
            if let (Some(bname), Some(b)) = (n.input.get(2).cloned().filter(|b| !b.is_empty()), bias) {
                let bscales: Vec<f32> = scales.iter().map(|s| s * s_x).collect();
                let mut bq = Vec::with_capacity(b.len() * 4);
                for (v, s) in b.iter().zip(&bscales) {
                    let x = (v / s).round();
                    if x.abs() > i32::MAX as f32 {
                        summary.biases_clamped += 1;
                    }
                    bq.extend((x.clamp(i32::MIN as f32, i32::MAX as f32) as i32).to_le_bytes());
                }
                let bi = format!("{bname}/int32");
                inits.insert(bi.clone(), tensor(&bi, &[b.len()], DataType::Int32, bq));
                inits.insert(format!("{bname}/scale"), vec_f32(&format!("{bname}/scale"), &bscales));
                inits.insert(
                    format!("{bname}/zero_point"),
                    tensor(&format!("{bname}/zero_point"), &[b.len()], DataType::Int32, vec![0; b.len() * 4]),
                );
                nodes.push(dequantize(&format!("{bname}/dq"), &bi, &bname, Some(0)));
                replaced.insert(bname.clone());
                n.input[2] = format!("{bname}/dq");
            }
            summary.quantized += 1;
        }
        // Activations are read through their dequantized copy, except by the nodes of a layer
        // kept float: ONNX Runtime quantizes the float weights of a convolution between a
        // dequantize and a quantize itself, so such a layer must read the float tensor.
        // The out-of-distribution score reads the float pooled features: its whitening
        // magnifies the uint8 rounding of the directions the training photos hardly vary in.
        let kept = keep_float.contains(&layer) || n.name.starts_with("ood/");
        for i in n.input.iter_mut().filter(|_| !kept) {
            if qparams.contains_key(i.as_str()) {
                *i = format!("{i}/dq");
            }
        }
        let outputs = n.output.clone();
        nodes.push(n);
        for t in outputs.iter().filter(|t| qparams.contains_key(t.as_str())) {
            nodes.push(NodeProto {
                op_type: "QuantizeLinear".into(),
                name: format!("{t}/q"),
                input: vec![t.clone(), format!("{t}/scale"), format!("{t}/zero_point")],
                output: vec![format!("{t}/q")],
                ..Default::default()
            });
            nodes.push(dequantize(&format!("{t}/dq"), &format!("{t}/q"), t, None));
            summary.activations += 1;
        }
    }
    graph.node = nodes;
    graph.initializer = inits.into_values().filter(|t| !replaced.contains(&t.name)).collect();
    Ok((model, summary))
}

/// The layer a node belongs to: `block2_sepconv1/depthwise` → `block2_sepconv1`.
fn layer_of(node: &str) -> &str {
    node.split('/').next().unwrap_or_default()
}

/// `DequantizeLinear` of `q` with the scale and zero point initializers of `base`.
fn dequantize(name: &str, q: &str, base: &str, axis: Option<i64>) -> NodeProto {
    NodeProto {
        op_type: "DequantizeLinear".into(),
        name: name.into(),
        input: vec![q.into(), format!("{base}/scale"), format!("{base}/zero_point")],
        output: vec![name.into()],
        attribute: axis.map(|a| vec![int("axis", a)]).unwrap_or_default(),
        ..Default::default()
    }
}

fn tensor(name: &str, dims: &[usize], ty: DataType, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: ty as i32,
        raw_data: raw,
        ..Default::default()
    }
}

fn scalar_f32(name: &str, v: f32) -> TensorProto {
    tensor(name, &[], DataType::Float, v.to_le_bytes().to_vec())
}

fn vec_f32(name: &str, v: &[f32]) -> TensorProto {
    tensor(name, &[v.len()], DataType::Float, v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn f32_values(t: &TensorProto) -> Result<Vec<f32>, GraphError> {
    if t.data_type != DataType::Float as i32 || !t.raw_data.len().is_multiple_of(4) {
        return Err(GraphError(format!("`{}` is not a float32 initializer", t.name)));
    }
    Ok(t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// The op types of a model's nodes and their counts (to tell a fused graph from a plain one).
pub fn op_counts(model: &ModelProto) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in model.graph.iter().flat_map(|g| &g.node) {
        *m.entry(n.op_type.clone()).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qparams_cover_the_range_and_keep_zero_exact() {
        let q = QParams::covering(-1.0, 3.0);
        assert!((q.scale - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(q.zero_point, 64);
        // A ReLU output: zero point 0, the whole range for positives.
        assert_eq!(QParams::covering(0.0, 6.0).zero_point, 0);
        // A range without zero is widened to include it.
        assert_eq!(QParams::covering(2.0, 5.0), QParams::covering(0.0, 5.0));
        assert!(QParams::covering(0.0, 0.0).scale > 0.0);
    }
}
