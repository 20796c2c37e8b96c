//! A loaded `model.onnx`: an ONNX Runtime session and what its metadata says (classes, input
//! size, preprocessing), checked against the graph's own input and outputs.

use crate::ortlib::{self, OrtLibError};
use modelspec::onnx_meta::{self, InputType, MetaError, OnnxInfo, LOGITS_NAME, OOD_SCORE_NAME, PROBABILITIES_NAME};
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};
use std::path::{Path, PathBuf};

/// How to build a session.
#[derive(Debug, Clone, Default)]
pub struct SessionConfig {
    /// Intra-op threads (0: ONNX Runtime's default, one per core).
    pub threads: usize,
    /// The ONNX Runtime library (else [`ortlib::candidates`]).
    pub ort_lib: Option<PathBuf>,
    /// Use the CUDA execution provider (needs onnxruntime-gpu's library and a GPU).
    pub cuda: bool,
    /// With `cuda`: fail instead of falling back to the CPU.
    pub require_cuda: bool,
    /// Turn off ONNX Runtime's CPU memory arena and memory patterns: less resident memory with
    /// large batches, but slower (measured: 0.75x the requests/s on 2 cores).
    pub no_arena: bool,
    /// Idle ONNX Runtime threads sleep instead of spinning (frees the cores for decoding).
    pub no_spin: bool,
    /// Turn off ONNX Runtime's memory patterns (one preplanned block per input shape seen) but
    /// keep the arena: for a server, whose batch sizes vary, it saves memory at no cost in
    /// speed (measured: 147-150 instead of 167-169 MiB resident, same requests/s).
    pub no_memory_pattern: bool,
    /// Write the graph as ONNX Runtime optimized it here (to check which kernels it chose, e.g.
    /// that an int8 file's QDQ nodes were fused into integer operators).
    pub optimized_model: Option<PathBuf>,
}

/// Why a model cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    OrtLib(#[from] OrtLibError),
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: ONNX Runtime cannot load it (truncated or not an ONNX model?): {reason}")]
    Session { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Meta { path: PathBuf, source: MetaError },
    #[error("{path}: {reason}")]
    Graph { path: PathBuf, reason: String },
    #[error("CUDA execution provider required but unavailable: {0}")]
    Cuda(String),
    #[error("input: {0}")]
    Input(String),
    #[error("ONNX Runtime: {0}")]
    Run(String),
}

/// The outputs for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub logits: Vec<f32>,
    pub probabilities: Vec<f32>,
    /// The graph's out-of-distribution score, in files that have the output.
    pub ood_score: Option<f32>,
}

impl Prediction {
    /// The most probable class (the first of equals), `None` without classes.
    pub fn top_class(&self) -> Option<usize> {
        self.probabilities.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map(|(i, _)| i)
    }
}

/// The ONNX Runtime execution provider a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ExecutionProvider {
    #[serde(rename = "CPU")]
    Cpu,
    #[serde(rename = "CUDA")]
    Cuda,
}

impl std::fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExecutionProvider::Cpu => "CPU",
            ExecutionProvider::Cuda => "CUDA",
        })
    }
}

/// Whether ONNX Runtime's uint8 × int8 kernels have VNNI here (x86: AVX512-VNNI or AVX-VNNI,
/// which add products in 32 bits). Without it they add pairs in 16 bits, which only 7-bit
/// weights keep from saturating. Other architectures do not have this problem.
pub fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

/// A model ready to run.
pub struct OnnxModel {
    session: Session,
    pub info: OnnxInfo,
    pub path: PathBuf,
    /// The execution provider the session runs on.
    pub provider: ExecutionProvider,
    /// The graph has the `ood_score` output (files since issue 29; its threshold is in
    /// `info.ood`, absent only while the exporter sets it).
    pub has_ood_score: bool,
}

impl OnnxModel {
    /// Loads `path` (an `.onnx` file written by the exporter).
    pub fn load(path: &Path, cfg: &SessionConfig) -> Result<Self, SessionError> {
        let bytes = std::fs::read(path).map_err(|source| SessionError::Read { path: path.into(), source })?;
        Self::from_bytes(&bytes, path, cfg)
    }

    /// Loads a model from memory; `path` only names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path, cfg: &SessionConfig) -> Result<Self, SessionError> {
        let lib = ortlib::init(cfg.ort_lib.as_deref(), cfg.cuda)?;
        let env = ortlib::environment().expect("initialised above");
        let session_err = |reason: String| SessionError::Session { path: path.into(), reason };
        let mut builder = Session::builder(env).map_err(|e| session_err(e.to_string()))?;
        if cfg.threads > 0 {
            builder = builder.with_intra_threads(cfg.threads).map_err(|e| session_err(e.to_string()))?;
        }
        let mut provider = ExecutionProvider::Cpu;
        if cfg.cuda {
            match ortlib::preload_cuda_libraries(&lib) {
                Ok(libs) if !libs.is_empty() => {
                    tracing::debug!("CUDA libraries loaded from {}", libs[0].parent().unwrap_or(&lib).display())
                }
                Ok(_) => {}
                Err(e) if cfg.require_cuda => return Err(SessionError::Cuda(e.to_string())),
                Err(e) => tracing::warn!("{e}"),
            }
            let ep = ort::ep::CUDA::default().build().error_on_failure();
            match ep.register(&mut builder) {
                Ok(()) => provider = ExecutionProvider::Cuda,
                Err(e) if cfg.require_cuda => {
                    return Err(SessionError::Cuda(format!(
                        "{e} (is onnxruntime-gpu's library loaded, and a GPU present?)"
                    )))
                }
                Err(e) => tracing::warn!("CUDA execution provider unavailable, running on the CPU: {e}"),
            }
        }
        if cfg.no_arena || cfg.no_memory_pattern {
            builder = builder.with_memory_pattern(false).map_err(|e| session_err(e.to_string()))?;
        }
        if cfg.no_arena {
            let cpu = ort::ep::CPU::default().with_arena_allocator(false).build();
            cpu.register(&mut builder).map_err(|e| session_err(e.to_string()))?;
        }
        if cfg.no_spin {
            builder = builder.with_intra_op_spinning(false).map_err(|e| session_err(e.to_string()))?;
        }
        if let Some(p) = &cfg.optimized_model {
            builder = builder.with_optimized_model_path(p).map_err(|e| session_err(e.to_string()))?;
        }
        let session = match builder.commit_from_memory(bytes) {
            Ok(s) => s,
            // The provider registered, but CUDA itself failed when the session started (no GPU,
            // a driver too old for the CUDA runtime, out of memory): the CPU, unless told not to.
            Err(e) if provider == ExecutionProvider::Cuda && e.to_string().contains("CUDA") => {
                if cfg.require_cuda {
                    return Err(SessionError::Cuda(format!("the CUDA execution provider failed to start: {e}")));
                }
                tracing::warn!("the CUDA execution provider failed to start, running on the CPU: {e}");
                return Self::from_bytes(bytes, path, &SessionConfig { cuda: false, ..cfg.clone() });
            }
            Err(e) => return Err(session_err(e.to_string())),
        };
        let meta = session.metadata().map_err(|e| session_err(e.to_string()))?;
        let info =
            onnx_meta::parse(|k| meta.custom(k)).map_err(|source| SessionError::Meta { path: path.into(), source })?;
        drop(meta);
        let has_ood_score = session.outputs().iter().any(|o| o.name() == OOD_SCORE_NAME);
        let model = Self { session, info, path: path.into(), provider, has_ood_score };
        model.check_graph()?;
        if provider == ExecutionProvider::Cpu && model.info.int8_weight_bits() == Some(8) && !cpu_has_vnni() {
            return Err(SessionError::Graph {
                path: path.into(),
                reason: "an int8 file with 8-bit weights, on a CPU without VNNI (AVX512-VNNI or AVX-VNNI): \
                    ONNX Runtime's integer kernels saturate there and give wrong classes (39% accuracy \
                    instead of 99% measured on the footwear model); export it again with the exporter's \
                    default `--weight-bits 7`, which runs correctly on every CPU"
                    .into(),
            });
        }
        Ok(model)
    }

    /// The graph must take [N, size, size, 3] of the metadata's input type and give the outputs
    /// the metadata promises.
    fn check_graph(&self) -> Result<(), SessionError> {
        let bad = |reason: String| Err(SessionError::Graph { path: self.path.clone(), reason });
        let size = self.info.description.input_size as i64;
        let Some(input) = self.session.inputs().first() else { return bad("the graph has no input".into()) };
        let want = match self.info.input_type {
            InputType::Uint8 => TensorElementType::Uint8,
            InputType::Float32 => TensorElementType::Float32,
        };
        match input.dtype() {
            ValueType::Tensor { ty, shape, .. } if *ty == want && shape.len() == 4 && shape[1..] == [size, size, 3] => {
            }
            other => {
                return bad(format!(
                    "input `{}` is {other:?}; expected {} [N, {size}, {size}, 3] as the metadata says",
                    input.name(),
                    self.info.input_type.as_str()
                ))
            }
        }
        if self.info.description.head.is_some() {
            for name in [LOGITS_NAME, PROBABILITIES_NAME] {
                if !self.session.outputs().iter().any(|o| o.name() == name) {
                    return bad(format!("the graph has no output `{name}`"));
                }
            }
        }
        if self.info.ood.is_some() && !self.has_ood_score {
            return bad(format!("the metadata sets an `ood` threshold but the graph has no output `{OOD_SCORE_NAME}`"));
        }
        Ok(())
    }

    /// Side of the square input, pixels.
    pub fn input_size(&self) -> usize {
        self.info.description.input_size
    }

    pub fn classes(&self) -> &[String] {
        &self.info.description.classes
    }

    /// Runs `n` images, each `size * size * 3` RGB bytes (resized, not scaled), one batch.
    pub fn run(&mut self, pixels: Vec<u8>, n: usize) -> Result<Vec<Prediction>, SessionError> {
        let s = self.input_size();
        if n == 0 || pixels.len() != n * s * s * 3 {
            return Err(SessionError::Input(format!(
                "{} bytes for {n} images of {s}x{s}x3 (expected {})",
                pixels.len(),
                n * s * s * 3
            )));
        }
        let input: ort::value::DynValue = match self.info.input_type {
            InputType::Uint8 => Tensor::from_array(([n, s, s, 3], pixels.into_boxed_slice())).map(|t| t.into_dyn()),
            InputType::Float32 => {
                let x = modelspec::preprocess::scale_pixels(&pixels, &self.info.preprocessing.steps);
                Tensor::from_array(([n, s, s, 3], x.into_boxed_slice())).map(|t| t.into_dyn())
            }
        }
        .map_err(|e| SessionError::Input(e.to_string()))?;
        let input_name = self.session.inputs()[0].name().to_string();
        // Checked after every run: a file whose graph disagrees with its metadata must not
        // hand out rows of the wrong length.
        let k = self.classes().len();
        let outputs =
            self.session.run(ort::inputs![input_name => input]).map_err(|e| SessionError::Run(e.to_string()))?;
        let get = |name: &str| -> Result<Vec<f32>, SessionError> {
            let v = outputs.get(name).ok_or_else(|| SessionError::Run(format!("no output `{name}`")))?;
            let (shape, data) = v.try_extract_tensor::<f32>().map_err(|e| SessionError::Run(format!("{name}: {e}")))?;
            if **shape != [n as i64, k as i64] || data.len() != n * k {
                return Err(SessionError::Run(format!(
                    "output `{name}` has shape {shape:?}; expected [{n}, {k}] ({n} images, {k} classes)"
                )));
            }
            Ok(data.to_vec())
        };
        let (logits, probs) = (get(LOGITS_NAME)?, get(PROBABILITIES_NAME)?);
        let ood = match self.has_ood_score {
            true => {
                let v = outputs
                    .get(OOD_SCORE_NAME)
                    .ok_or_else(|| SessionError::Run(format!("no output `{OOD_SCORE_NAME}`")))?;
                let (shape, data) =
                    v.try_extract_tensor::<f32>().map_err(|e| SessionError::Run(format!("{OOD_SCORE_NAME}: {e}")))?;
                if **shape != [n as i64] || data.len() != n {
                    return Err(SessionError::Run(format!(
                        "output `{OOD_SCORE_NAME}` has shape {shape:?}; expected [{n}] ({n} images)"
                    )));
                }
                Some(data.to_vec())
            }
            false => None,
        };
        Ok((0..n)
            .map(|i| Prediction {
                logits: logits[i * k..(i + 1) * k].to_vec(),
                probabilities: probs[i * k..(i + 1) * k].to_vec(),
                ood_score: ood.as_ref().map(|o| o[i]),
            })
            .collect())
    }
}

/// One output of a [`FloatSession`]: its shape and values.
pub type FloatOutput = (Vec<usize>, Vec<f32>);

/// A plain float32 graph (no classifier metadata): one input, named float32 outputs. The
/// trainer runs its frozen base through it (`onnxgraph::build_frozen`).
pub struct FloatSession {
    session: Session,
    name: PathBuf,
}

impl FloatSession {
    /// Loads a model from memory with `threads` intra-op threads (0: one per core) on the CPU;
    /// `name` names it in errors.
    pub fn from_bytes(bytes: &[u8], name: &Path, threads: usize, ort_lib: Option<&Path>) -> Result<Self, SessionError> {
        ortlib::init(ort_lib, false)?;
        let env = ortlib::environment().expect("initialised above");
        let session_err = |reason: String| SessionError::Session { path: name.into(), reason };
        let mut builder = Session::builder(env).map_err(|e| session_err(e.to_string()))?;
        if threads > 0 {
            builder = builder.with_intra_threads(threads).map_err(|e| session_err(e.to_string()))?;
        }
        let session = builder.commit_from_memory(bytes).map_err(|e| session_err(e.to_string()))?;
        Ok(Self { session, name: name.into() })
    }

    /// Runs `input` of `shape` and returns the outputs `names`, each as (shape, values).
    pub fn run(&mut self, input: Vec<f32>, shape: &[usize], names: &[&str]) -> Result<Vec<FloatOutput>, SessionError> {
        if input.len() != shape.iter().product::<usize>() {
            return Err(SessionError::Input(format!("{} values for shape {shape:?}", input.len())));
        }
        let x = Tensor::from_array((shape.to_vec(), input.into_boxed_slice()))
            .map_err(|e| SessionError::Input(e.to_string()))?;
        let input_name = self.session.inputs()[0].name().to_string();
        let outputs = self
            .session
            .run(ort::inputs![input_name => x])
            .map_err(|e| SessionError::Run(format!("{}: {e}", self.name.display())))?;
        names
            .iter()
            .map(|name| {
                let v = outputs.get(name).ok_or_else(|| SessionError::Run(format!("no output `{name}`")))?;
                let (shape, data) =
                    v.try_extract_tensor::<f32>().map_err(|e| SessionError::Run(format!("{name}: {e}")))?;
                Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
            })
            .collect()
    }
}
