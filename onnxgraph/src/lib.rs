//! The ONNX graph of a model directory, built node by node from the same block list as the
//! Candle network ([`models::layers::blocks`]).
//!
//! - Input `image`: uint8 [N, size, size, 3], the decoded and resized RGB image; the graph casts
//!   it, scales it to [-1, 1] and transposes it to NCHW, so a runtime only decodes and resizes.
//!   (With [`InputType::Float32`]: float [N, size, size, 3] already scaled, for float-only tools.)
//! - Every convolution has its batch-norm folded in (`w·s`, `β − μ·s`, `s = γ/√(σ²+ε)`, as the
//!   Candle model folds them); depthwise convolutions are `Conv` with `group = channels`.
//! - 'same' max-pooling is a padded `MaxPool` (ONNX pads it with -inf, as TF does). candle-onnx
//!   reads no padded `MaxPool`: [`with_explicit_pads`] rewrites a model for it. Global average
//!   pooling is `ReduceMean` (candle-onnx lacks `GlobalAveragePool`).
//! - Outputs `logits` and `probabilities` (softmax), float32, [N, classes]; a model without a
//!   head gives `features` [N, 2048].
//! - With the out-of-distribution fit of `models::ood` among the weights ([`ood::PROJECTION`],
//!   [`ood::CENTRES`]), a third output `ood_score`, float32 [N]: `min_c |u·P − centre_c|² / D` of
//!   the pooled features' direction `u = f / |f|` (`Mul`, `ReduceSum`, `Sqrt`, `Div`, then
//!   `MatMul`, `Sub`, `Mul`, `ReduceSum`, `ReduceMin`), computed in
//!   float32 whatever the file's precision (an f16 sum of 2,048 squares can overflow; a float16
//!   file stores the fit in float16; the int8 file keeps it float32 and reads the float pooled
//!   features, not their uint8 copy).
//!
//! With [`OnnxPrecision::F16`] the weights and the network run in float16 between the scaling and
//! the logits (for the CUDA execution provider); input and outputs keep their types.

use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use models::head::{DENSE, LOGITS};
use models::layers::{self, ConvSpec, Padding, Relu, Residual, SepConvSpec, BN_EPSILON, FEATURES};
use models::ood;
use modelspec::onnx_meta::{
    self, InputType, FEATURES_NAME, INPUT_NAME, LOGITS_NAME, OOD_SCORE_NAME, PROBABILITIES_NAME,
};
use modelspec::ModelDescription;
pub use quant::{build_int8, Int8Summary, TapRanges, PORTABLE_WEIGHT_BITS};
use std::collections::HashMap;

pub mod quant;

/// The operator set the graph uses (ONNX Runtime 1.31 and candle-onnx both read it).
pub const OPSET: i64 = 17;
/// The IR version that goes with opset 17.
pub const IR_VERSION: i64 = 8;

/// Floating-point type of the file's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnnxPrecision {
    F32,
    F16,
}

/// A model's weights as plain arrays: name → (shape, values).
pub type Weights = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Why the graph cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("weights: {0}")]
pub struct GraphError(String);

struct Builder<'w> {
    w: &'w Weights,
    precision: OnnxPrecision,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// Where the value range of each activation that an int8 file quantizes comes from.
    ranges: Vec<(String, quant::RangeSource)>,
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Ints as i32, ints: v.to_vec(), ..Default::default() }
}

pub(crate) fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: v, ..Default::default() }
}

fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn value_info(name: &str, elem: DataType, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Ok(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                Err(p) => tensor_shape_proto::dimension::Value::DimParam((*p).into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl<'w> Builder<'w> {
    fn get(&self, name: &str) -> Result<&'w (Vec<usize>, Vec<f32>), GraphError> {
        self.w.get(name).ok_or_else(|| GraphError(format!("no tensor `{name}`")))
    }

    /// Adds a node; its single output is named after the node.
    fn node(&mut self, op: &str, name: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.into()],
            attribute: attrs,
            ..Default::default()
        });
        name.into()
    }

    /// A weight initializer in the graph's precision.
    fn weight(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        let (data_type, raw_data) = match self.precision {
            OnnxPrecision::F32 => (DataType::Float, data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            OnnxPrecision::F16 => {
                (DataType::Float16, data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect())
            }
        };
        self.inits.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type as i32,
            raw_data,
            ..Default::default()
        });
        name.into()
    }

    /// A float32 tensor initializer whatever the graph's precision.
    fn tensor_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        self.inits.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    /// The `ood_score` output on `pooled` ([2N, D] with `flip`: the image's and its mirror's
    /// features are averaged first), when the weights hold the fit; `classes` checks its centres.
    fn ood_score(&mut self, pooled: &str, flip: bool, classes: usize) -> Result<bool, GraphError> {
        let (p, c) = match (self.w.get(ood::PROJECTION), self.w.get(ood::CENTRES)) {
            (Some(p), Some(c)) => (p, c),
            (None, None) => return Ok(false),
            _ => return Err(GraphError(format!("{} and {} go together", ood::PROJECTION, ood::CENTRES))),
        };
        let d = FEATURES;
        if p.0 != [d, d] || c.0 != [classes, d] {
            return Err(GraphError(format!(
                "out-of-distribution fit: {} {:?} and {} {:?}, expected [{d}, {d}] and [{classes}, {d}]",
                ood::PROJECTION,
                p.0,
                ood::CENTRES,
                c.0
            )));
        }
        let mut x = pooled.to_string();
        if self.precision == OnnxPrecision::F16 {
            x = self.node("Cast", "ood/f32", &[&x], vec![int("to", DataType::Float as i64)]);
        }
        if flip {
            let shape = self.const_i64s("ood/flip/shape", &[2, -1, d as i64]);
            let halves = self.node("Reshape", "ood/flip/halves", &[&x, &shape], vec![]);
            x = self.node("ReduceMean", "ood/flip/mean", &[&halves], vec![ints("axes", &[0]), int("keepdims", 0)]);
        }
        // The features' direction only (models::ood): x / sqrt(|x|^2 + eps).
        let sq = self.node("Mul", "ood/unit/squares", &[&x, &x], vec![]);
        let one = self.const_i64s("ood/unit/axis", &[1]);
        let len2 = self.node("ReduceSum", "ood/unit/length2", &[&sq, &one], vec![int("keepdims", 1)]);
        let eps = self.const_f32("ood/unit/eps", ood::NORM_EPS as f32);
        let len2 = self.node("Add", "ood/unit/length2_eps", &[&len2, &eps], vec![]);
        let len = self.node("Sqrt", "ood/unit/length", &[&len2], vec![]);
        x = self.node("Div", "ood/unit", &[&x, &len], vec![]);
        // A float16 file stores them in float16 too (8 MiB instead of 16), cast once to float32
        // (ONNX Runtime folds the cast when it loads the file).
        let (pn, cn) = match self.precision {
            OnnxPrecision::F32 => {
                (self.tensor_f32("ood/projection", &p.0, &p.1), self.tensor_f32("ood/centres", &c.0, &c.1))
            }
            OnnxPrecision::F16 => {
                let to = || vec![int("to", DataType::Float as i64)];
                let pw = self.weight("ood/projection/f16", &p.0, &p.1);
                let cw = self.weight("ood/centres/f16", &c.0, &c.1);
                (self.node("Cast", "ood/projection", &[&pw], to()), self.node("Cast", "ood/centres", &[&cw], to()))
            }
        };
        let z = self.node("MatMul", "ood/whitened", &[&x, &pn], vec![]);
        let one = self.const_i64s("ood/axis1", &[1]);
        let z = self.node("Unsqueeze", "ood/whitened/rows", &[&z, &one], vec![]);
        // [N, 1, D] − [K, D] → [N, K, D]: the squared distance to each class's centre.
        let diff = self.node("Sub", "ood/to_centres", &[&z, &cn], vec![]);
        let sq = self.node("Mul", "ood/squares", &[&diff, &diff], vec![]);
        let two = self.const_i64s("ood/axis2", &[2]);
        let dist = self.node("ReduceSum", "ood/distances", &[&sq, &two], vec![int("keepdims", 0)]);
        let nearest = self.node("ReduceMin", "ood/nearest", &[&dist], vec![ints("axes", &[1]), int("keepdims", 0)]);
        let per = self.const_f32("ood/per_feature", 1.0 / d as f32);
        self.node("Mul", OOD_SCORE_NAME, &[&nearest, &per], vec![]);
        Ok(true)
    }

    /// A float32 constant (used before the cast to the graph's precision).
    fn const_f32(&mut self, name: &str, v: f32) -> String {
        self.inits.push(TensorProto {
            name: name.into(),
            dims: vec![],
            data_type: DataType::Float as i32,
            raw_data: v.to_le_bytes().to_vec(),
            ..Default::default()
        });
        name.into()
    }

    /// An int64 vector constant.
    fn const_i64s(&mut self, name: &str, v: &[i64]) -> String {
        self.inits.push(TensorProto {
            name: name.into(),
            dims: vec![v.len() as i64],
            data_type: DataType::Int64 as i32,
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    /// Batch-norm `{bn}` as a per-channel scale and shift, computed as the Candle model does (f32).
    fn bn(&self, bn: &str) -> Result<(Vec<f32>, Vec<f32>), GraphError> {
        let g = &self.get(&format!("{bn}.gamma"))?.1;
        let b = &self.get(&format!("{bn}.beta"))?.1;
        let m = &self.get(&format!("{bn}.moving_mean"))?.1;
        let v = &self.get(&format!("{bn}.moving_variance"))?.1;
        let s: Vec<f32> = g.iter().zip(v).map(|(g, v)| g / (v + BN_EPSILON as f32).sqrt()).collect();
        let shift = b.iter().zip(m).zip(&s).map(|((b, m), s)| b - m * s).collect();
        Ok((s, shift))
    }

    /// Padding attributes of a window over a map of side `size` (none when it needs none),
    /// and the output side.
    fn window(
        padding: Padding,
        size: usize,
        k: usize,
        stride: usize,
    ) -> Result<(Vec<AttributeProto>, usize), GraphError> {
        let (out, p) = padding
            .window(size, k, stride)
            .ok_or_else(|| GraphError(format!("a {size} px map is smaller than a {k} px window")))?;
        let (b, e) = (p.before as i64, p.after as i64);
        let attrs = if b == 0 && e == 0 { vec![] } else { vec![ints("pads", &[b, b, e, e])] };
        Ok((attrs, out))
    }

    /// Dense convolution `spec` (kernel HWIO) + batch-norm `{name}_bn`, folded, with its ReLU,
    /// on a map of side `size`; returns the output and its side.
    fn conv_bn(&mut self, x: &str, spec: &ConvSpec, size: usize) -> Result<(String, usize), GraphError> {
        let name = &spec.name;
        let (shape, k) = self.get(&format!("{name}.kernel"))?;
        let (kh, kw, cin, cout) = (shape[0], shape[1], shape[2], shape[3]);
        let (s, shift) = self.bn(&format!("{name}_bn"))?;
        let mut w = vec![0f32; k.len()];
        for y in 0..kh {
            for xx in 0..kw {
                for ci in 0..cin {
                    for co in 0..cout {
                        w[((co * cin + ci) * kh + y) * kw + xx] = k[((y * kw + xx) * cin + ci) * cout + co] * s[co];
                    }
                }
            }
        }
        let wn = self.weight(&format!("{name}.weight"), &[cout, cin, kh, kw], &w);
        let bn = self.weight(&format!("{name}.bias"), &[cout], &shift);
        let (pads, out) = Self::window(spec.padding, size, kh, spec.stride)?;
        let stride = spec.stride as i64;
        let mut attrs = vec![ints("kernel_shape", &[kh as i64, kw as i64]), ints("strides", &[stride, stride])];
        attrs.extend(pads);
        let x = if spec.relu == Relu::Before { self.relu_of(x) } else { x.to_string() };
        let y = self.node("Conv", name, &[&x, &wn, &bn], attrs);
        Ok((self.conv_output(y, name, spec.relu), out))
    }

    /// Separable convolution `spec` (depthwise 3x3 'same', then pointwise) + batch-norm, with
    /// its ReLU.
    fn sepconv_bn(&mut self, x: &str, spec: &SepConvSpec) -> Result<String, GraphError> {
        let name = &spec.name;
        let x = if spec.relu == Relu::Before { self.relu_of(x) } else { x.to_string() };
        let (dshape, dw) = self.get(&format!("{name}.depthwise"))?;
        let c = dshape[2];
        let mut d = vec![0f32; dw.len()];
        for y in 0..3 {
            for xx in 0..3 {
                for ch in 0..c {
                    d[(ch * 3 + y) * 3 + xx] = dw[(y * 3 + xx) * c + ch];
                }
            }
        }
        let dn = self.weight(&format!("{name}.depthwise"), &[c, 1, 3, 3], &d);
        let attrs = vec![ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1]), int("group", c as i64)];
        let x = self.node("Conv", &format!("{name}/depthwise"), &[&x, &dn], attrs);
        self.ranges.push((x.clone(), quant::RangeSource::Tap(format!("{name}_depthwise"))));
        let (pshape, pw) = self.get(&format!("{name}.pointwise"))?;
        let (cin, cout) = (pshape[0], pshape[1]);
        let (s, shift) = self.bn(&format!("{name}_bn"))?;
        let mut w = vec![0f32; pw.len()];
        for ci in 0..cin {
            for co in 0..cout {
                w[co * cin + ci] = pw[ci * cout + co] * s[co];
            }
        }
        let wn = self.weight(&format!("{name}.pointwise"), &[cout, cin, 1, 1], &w);
        let bn = self.weight(&format!("{name}.bias"), &[cout], &shift);
        let y = self.node("Conv", &format!("{name}/pointwise"), &[&x, &wn, &bn], vec![ints("kernel_shape", &[1, 1])]);
        Ok(self.conv_output(y, name, spec.relu))
    }

    /// A convolution's output, through its ReLU when it comes after; its range is that of the
    /// Candle tap of the same value (`{name}_act` after a ReLU, else `{name}_bn`).
    fn conv_output(&mut self, y: String, name: &str, relu: Relu) -> String {
        let (y, tap) =
            if relu == Relu::After { (self.relu(&y), format!("{name}_act")) } else { (y, format!("{name}_bn")) };
        self.ranges.push((y.clone(), quant::RangeSource::Tap(tap)));
        y
    }

    /// A ReLU on `x` whose range follows from `x`'s.
    fn relu_of(&mut self, x: &str) -> String {
        let y = self.relu(x);
        self.ranges.push((y.clone(), quant::RangeSource::Relu(x.to_string())));
        y
    }

    /// Blocks `1..=upto` on `x`, a map of side `size`; `tap(block, output)` sees each block's
    /// output. Returns the last block's output.
    fn blocks(
        &mut self,
        mut x: String,
        mut size: usize,
        upto: usize,
        tap: &mut dyn FnMut(usize, &str),
    ) -> Result<String, GraphError> {
        // Side of the current map: pads of 'same' windows depend on it.
        for block in layers::blocks().into_iter().take(upto) {
            let (input, input_size) = (x.clone(), size);
            for c in &block.convs {
                (x, size) = self.conv_bn(&x, c, size)?;
            }
            for s in &block.sepconvs {
                x = self.sepconv_bn(&x, s)?;
            }
            if block.pool {
                // ONNX pads a MaxPool with -inf, as TF's 'same' pooling does.
                let (k, stride) = layers::POOL;
                let (pads, out) = Builder::window(Padding::Same, size, k, stride)?;
                let mut attrs = vec![ints("kernel_shape", &[k as i64, k as i64]), ints("strides", &[stride as i64; 2])];
                attrs.extend(pads);
                let input = x.clone();
                x = self.node("MaxPool", &format!("block{}_pool", block.index), &[&x], attrs);
                // The input's quantization: ONNX Runtime then pools the uint8 values directly.
                self.ranges.push((x.clone(), quant::RangeSource::Same(input)));
                size = out;
            }
            let residual = match &block.residual {
                None => None,
                Some(Residual::Identity) => Some(input),
                Some(Residual::Conv(c)) => Some(self.conv_bn(&input, c, input_size)?.0),
            };
            if let Some(r) = residual {
                x = self.node("Add", &format!("block{}_add", block.index), &[&x, &r], vec![]);
                self.ranges.push((x.clone(), quant::RangeSource::Tap(format!("block{}_add", block.index))));
            }
            tap(block.index, &x);
        }
        Ok(x)
    }

    fn relu(&mut self, x: &str) -> String {
        self.node("Relu", &format!("{x}/relu"), &[x], vec![])
    }

    fn gemm(&mut self, x: &str, name: &str) -> Result<String, GraphError> {
        let (ws, w) = self.get(&format!("{name}.weight"))?;
        let (bs, b) = self.get(&format!("{name}.bias"))?;
        let wn = self.weight(&format!("{name}.weight"), ws, w);
        let bn = self.weight(&format!("{name}.bias"), bs, b);
        Ok(self.node("Gemm", name, &[x, &wn, &bn], vec![int("transB", 1)]))
    }
}

/// The same model for candle-onnx, which reads neither a padded `MaxPool` nor a constant `Pad`:
/// each padded `MaxPool` becomes a reflect `Pad` and an unpadded `MaxPool`. For the 3x3/2
/// windows of this graph a padded row or column is reflected from its neighbour, which the window
/// already holds, so every maximum is the one -inf padding gives. (Padded pooling runs 1.05x
/// faster in ONNX Runtime than `Pad` + `MaxPool`: docs/benchmarks.md.)
pub fn with_explicit_pads(mut model: ModelProto) -> ModelProto {
    let Some(graph) = model.graph.as_mut() else { return model };
    let mut nodes = Vec::with_capacity(graph.node.len());
    for mut n in std::mem::take(&mut graph.node) {
        let pads =
            n.attribute.iter().position(|a| a.name == "pads" && a.ints.len() == 4 && a.ints.iter().any(|&p| p != 0));
        let (Some(i), "MaxPool", [x]) = (pads, n.op_type.as_str(), n.input.as_slice()) else {
            nodes.push(n);
            continue;
        };
        // MaxPool's pads are [h_begin, w_begin, h_end, w_end]; Pad's cover N, C, H, W.
        let p = n.attribute.remove(i).ints;
        let (pads_name, padded) = (format!("{}/pads", n.name), format!("{}/padded", n.name));
        let pads = [0, 0, p[0], p[1], 0, 0, p[2], p[3]];
        graph.initializer.push(TensorProto {
            name: pads_name.clone(),
            dims: vec![pads.len() as i64],
            data_type: DataType::Int64 as i32,
            raw_data: pads.iter().flat_map(|v: &i64| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        nodes.push(NodeProto {
            op_type: "Pad".into(),
            name: padded.clone(),
            input: vec![x.clone(), pads_name],
            output: vec![padded.clone()],
            attribute: vec![string("mode", "reflect")],
            ..Default::default()
        });
        n.input[0] = padded;
        nodes.push(n);
    }
    graph.node = nodes;
    model
}

/// The ONNX model of `desc` with weights `w`, metadata `props`.
pub fn build(
    desc: &ModelDescription,
    w: &Weights,
    precision: OnnxPrecision,
    input_type: InputType,
    props: &[(String, String)],
    model_version: i64,
    producer: (&str, &str),
) -> Result<ModelProto, GraphError> {
    Ok(build_with_ranges(desc, w, precision, input_type, props, model_version, producer)?.0)
}

/// [`build`], and where the range of each activation an int8 file quantizes comes from.
fn build_with_ranges(
    desc: &ModelDescription,
    w: &Weights,
    precision: OnnxPrecision,
    input_type: InputType,
    props: &[(String, String)],
    model_version: i64,
    producer: (&str, &str),
) -> Result<(ModelProto, Vec<(String, quant::RangeSource)>), GraphError> {
    let mut b = Builder { w, precision, nodes: Vec::new(), inits: Vec::new(), ranges: Vec::new() };
    // Test-time flip averaging, when the metadata says so: the network runs on each image and
    // its mirror image (one batch of 2N), and the outputs are the means of the two halves.
    let flip = props.iter().any(|(k, v)| k == onnx_meta::TEST_TIME_AUGMENTATION && v == onnx_meta::FLIP);
    if flip && desc.head.is_none() {
        return Err(GraphError("flip averaging needs a classifier head".into()));
    }
    let p = &desc.preprocessing;
    let scaled = match input_type {
        InputType::Uint8 => {
            let x = b.node("Cast", "input/cast", &[INPUT_NAME], vec![int("to", DataType::Float as i64)]);
            let scale = b.const_f32("input/scale_value", p.scale);
            let x = b.node("Mul", "input/scale", &[&x, &scale], vec![]);
            let offset = b.const_f32("input/offset_value", p.offset);
            b.node("Add", "input/offset", &[&x, &offset], vec![])
        }
        InputType::Float32 => INPUT_NAME.to_string(),
    };
    let mut x = b.node("Transpose", "input/nchw", &[&scaled], vec![ints("perm", &[0, 3, 1, 2])]);
    let (lo, hi) = (p.offset, 255.0 * p.scale + p.offset);
    b.ranges.push((x.clone(), quant::RangeSource::Fixed(lo.min(hi), lo.max(hi))));
    if flip {
        let nchw = x.clone();
        let starts = b.const_i64s("input/mirror/starts", &[-1]);
        let ends = b.const_i64s("input/mirror/ends", &[i64::MIN]);
        let axes = b.const_i64s("input/mirror/axes", &[3]);
        let steps = b.const_i64s("input/mirror/steps", &[-1]);
        let m = b.node("Slice", "input/mirror", &[&nchw, &starts, &ends, &axes, &steps], vec![]);
        x = b.node("Concat", "input/with_mirror", &[&nchw, &m], vec![int("axis", 0)]);
        b.ranges.push((m, quant::RangeSource::Same(nchw.clone())));
        b.ranges.push((x.clone(), quant::RangeSource::Same(nchw)));
    }
    if precision == OnnxPrecision::F16 {
        x = b.node("Cast", "input/f16", &[&x], vec![int("to", DataType::Float16 as i64)]);
    }
    let x = b.blocks(x, desc.input_size, layers::NUM_BLOCKS, &mut |_, _| {})?;
    let pooled = b.node("ReduceMean", "avg_pool", &[&x], vec![ints("axes", &[2, 3]), int("keepdims", 0)]);
    b.ranges.push((pooled.clone(), quant::RangeSource::Tap(quant::POOLED_TAP.into())));
    let mut outputs = Vec::new();
    let batch: Result<i64, &str> = Err("batch");
    match &desc.head {
        Some(h) => {
            let y = b.gemm(&pooled, DENSE)?;
            let y = b.relu(&y);
            b.ranges.push((y.clone(), quant::RangeSource::Tap(quant::DENSE_TAP.into())));
            let mut logits = b.gemm(&y, LOGITS)?;
            if precision == OnnxPrecision::F16 {
                logits = b.node("Cast", "logits/f32", &[&logits], vec![int("to", DataType::Float as i64)]);
            }
            // Name the outputs by renaming the last nodes' outputs through Identity.
            if flip {
                // [2N, C] → [2, N, C] → mean over the image and its mirror.
                let shape = b.const_i64s("flip/shape", &[2, -1, h.classes as i64]);
                let probs = b.node("Softmax", "flip/probabilities", &[&logits], vec![int("axis", 1)]);
                for (x, out) in [(logits.clone(), LOGITS_NAME), (probs, PROBABILITIES_NAME)] {
                    let halves = b.node("Reshape", &format!("flip/{out}/halves"), &[&x, &shape], vec![]);
                    let mean = b.node(
                        "ReduceMean",
                        &format!("flip/{out}/mean"),
                        &[&halves],
                        vec![ints("axes", &[0]), int("keepdims", 0)],
                    );
                    b.node("Identity", out, &[&mean], vec![]);
                }
            } else {
                b.node("Identity", LOGITS_NAME, &[&logits], vec![]);
                b.node("Softmax", PROBABILITIES_NAME, &[LOGITS_NAME], vec![int("axis", 1)]);
            }
            let c = Ok(h.classes as i64);
            outputs.push(value_info(LOGITS_NAME, DataType::Float, &[batch, c]));
            outputs.push(value_info(PROBABILITIES_NAME, DataType::Float, &[batch, c]));
            if b.ood_score(&pooled, flip, h.classes)? {
                outputs.push(value_info(OOD_SCORE_NAME, DataType::Float, &[batch]));
            }
        }
        None => {
            if w.contains_key(ood::PROJECTION) {
                return Err(GraphError("an out-of-distribution fit needs a classifier head".into()));
            }
            let f = if precision == OnnxPrecision::F16 {
                b.node("Cast", "features/f32", &[&pooled], vec![int("to", DataType::Float as i64)])
            } else {
                pooled
            };
            b.node("Identity", FEATURES_NAME, &[&f], vec![]);
            outputs.push(value_info(FEATURES_NAME, DataType::Float, &[batch, Ok(FEATURES as i64)]));
        }
    }
    let s = desc.input_size as i64;
    let graph = GraphProto {
        name: desc.name.clone(),
        node: b.nodes,
        initializer: b.inits,
        input: vec![value_info(
            INPUT_NAME,
            if input_type == InputType::Uint8 { DataType::Uint8 } else { DataType::Float },
            &[batch, Ok(s), Ok(s), Ok(3)],
        )],
        output: outputs,
        doc_string: format!(
            "Xception classifier `{}`: uint8 RGB [N, {s}, {s}, 3] (decoded, resized {}) -> logits, probabilities over {:?}",
            desc.name, desc.preprocessing.resize, desc.classes
        ),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: producer.0.into(),
        producer_version: producer.1.into(),
        model_version,
        doc_string: format!("{} ({})", desc.name, desc.source),
        graph: Some(graph),
        metadata_props: props
            .iter()
            .map(|(k, v)| StringStringEntryProto { key: k.clone(), value: v.clone() })
            .collect(),
        ..Default::default()
    };
    Ok((model, b.ranges))
}

/// Output of [`build_frozen`]: the output of the last frozen block, NHWC.
pub const MAP_NAME: &str = "map";

/// The frozen ImageNet base as the trainer caches it: input `image`, float32 [N, size, size, 3]
/// already scaled; outputs [`MAP_NAME`], the output of block `upto` as [N, h, w, c] (the layout
/// of the Candle network), and `features`, the pooled [N, 2048] of the whole base. Weights stay
/// float32: the features must match the Candle network's.
pub fn build_frozen(w: &Weights, input_size: usize, upto: usize) -> Result<ModelProto, GraphError> {
    if !(1..=layers::NUM_BLOCKS).contains(&upto) {
        return Err(GraphError(format!("no block {upto} (1 to {})", layers::NUM_BLOCKS)));
    }
    let mut b = Builder { w, precision: OnnxPrecision::F32, nodes: Vec::new(), inits: Vec::new(), ranges: Vec::new() };
    let x = b.node("Transpose", "input/nchw", &[INPUT_NAME], vec![ints("perm", &[0, 3, 1, 2])]);
    let mut tapped = String::new();
    let x = b.blocks(x, input_size, layers::NUM_BLOCKS, &mut |i, name| {
        if i == upto {
            tapped = name.to_string();
        }
    })?;
    b.node("Transpose", MAP_NAME, &[&tapped], vec![ints("perm", &[0, 2, 3, 1])]);
    let pooled = b.node("ReduceMean", "avg_pool", &[&x], vec![ints("axes", &[2, 3]), int("keepdims", 0)]);
    b.node("Identity", FEATURES_NAME, &[&pooled], vec![]);
    let batch: Result<i64, &str> = Err("batch");
    let s = input_size as i64;
    let side = models::layers::output_size_after(input_size, upto) as i64;
    let channels = layers::blocks()[upto - 1].channels_out() as i64;
    let graph = GraphProto {
        name: format!("xception_blocks_1_{upto}"),
        node: b.nodes,
        initializer: b.inits,
        input: vec![value_info(INPUT_NAME, DataType::Float, &[batch, Ok(s), Ok(s), Ok(3)])],
        output: vec![
            value_info(MAP_NAME, DataType::Float, &[batch, Ok(side), Ok(side), Ok(channels)]),
            value_info(FEATURES_NAME, DataType::Float, &[batch, Ok(FEATURES as i64)]),
        ],
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: "footwear-trainer".into(),
        graph: Some(graph),
        ..Default::default()
    })
}
