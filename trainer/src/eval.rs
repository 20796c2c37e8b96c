//! `trainer eval RUN_DIR FOLDER...`: the metrics and confusion matrix of a trained run on any
//! labelled folder (`FOLDER/<class>/...`, the run's classes), optionally on the files whose name
//! matches a pattern only (e.g. the later photos of footwear-15k). The whole network runs on
//! ONNX Runtime (a graph built in memory from the run's weights) when its library is found,
//! else on Candle; both give the trainer's own predictions (logits within 1e-5). With `--with`
//! the prediction is the mean of several runs' probabilities (an ensemble of members).

use crate::config::CacheEngine;
use crate::metrics::{self, Report};
use crate::progress::Progress;
use anyhow::{bail, Context};
use candle_core::{Device, ModuleT, Tensor};
use models::classifier::Classifier;
use models::weights::ModelDir;
use modelspec::preprocess::{decode_batch, image_files, scale_pixels, DecodeLimits, Source};
use modelspec::ModelDescription;
use std::path::{Path, PathBuf};

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub run_dir: PathBuf,
    /// Further runs of the same classes, input size and preprocessing: the prediction is then
    /// the average of every run's probabilities (an ensemble).
    pub with: Vec<PathBuf>,
    pub folders: Vec<PathBuf>,
    /// A split of the run itself (its `splits.csv`: what it held out, carved or not), evaluated
    /// after the folders.
    pub split: Option<modelspec::splits::Split>,
    /// Only files whose name (not the folder) matches.
    pub only: Option<regex::Regex>,
    /// ONNX Runtime (`auto`: when found) or Candle.
    pub engine: CacheEngine,
    pub ort_lib: Option<PathBuf>,
    pub batch: usize,
    /// Average each photo's probabilities with its mirror image's (test-time flip averaging).
    pub flip: bool,
    /// Test-time input size instead of the run's own (`None`: the run's).
    pub image_size: Option<usize>,
}

/// The metrics of one folder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FolderReport {
    pub folder: PathBuf,
    /// The pattern applied to file names, if any.
    pub only: Option<String>,
    /// Files listed (after the pattern), and those that could not be read (with the reason).
    pub files: usize,
    pub unreadable: Vec<String>,
    pub engine: String,
    /// Whether each photo's prediction averaged it with its mirror image.
    pub flip: bool,
    /// The side the photos were resized to.
    pub image_size: usize,
    /// The runs whose probabilities were averaged (more than one: an ensemble).
    pub runs: Vec<PathBuf>,
    pub report: Report,
    /// The files predicted wrong, most confident first.
    pub errors: Vec<crate::report::Mistake>,
    /// The run's own split evaluated (`--split`), `None` for a folder.
    pub split: Option<modelspec::splits::Split>,
    /// Files of the folder that the run trained on (by its `splits.csv`): figures on them are
    /// not figures on new photos.
    pub trained_on: usize,
}

/// The labelled files of `folder`: every image under `folder/<class>/`, filtered by `only`.
pub fn labelled_files(
    folder: &Path,
    classes: &[String],
    only: Option<&regex::Regex>,
) -> anyhow::Result<Vec<(PathBuf, u32)>> {
    if !folder.is_dir() {
        bail!("{}: not a folder", folder.display());
    }
    let mut out = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = folder.join(class);
        if !dir.is_dir() {
            continue;
        }
        for f in image_files(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if only.is_none_or(|re| re.is_match(&name)) {
                out.push((f, label as u32));
            }
        }
    }
    if out.is_empty() {
        bail!(
            "{}: no images{} in the class folders {classes:?}",
            folder.display(),
            only.map(|r| format!(" whose name matches `{r}`")).unwrap_or_default()
        );
    }
    Ok(out)
}

/// The photos of one split of the run, from its `splits.csv`.
fn run_split(
    o: &EvalOptions,
    desc: &ModelDescription,
    split: modelspec::splits::Split,
) -> anyhow::Result<Vec<(PathBuf, u32)>> {
    let root =
        desc.dataset.as_ref().with_context(|| format!("{}: the run names no data folder", o.run_dir.display()))?;
    let Some(files) = modelspec::splits::photos_of(&o.run_dir, root, &desc.classes, split)? else {
        bail!(
            "{}: no {} (a run written before splits were recorded): give the folder instead",
            o.run_dir.display(),
            modelspec::splits::SPLITS_FILE
        );
    };
    let files: Vec<(PathBuf, u32)> = files
        .into_iter()
        .filter(|(f, _)| {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            o.only.as_ref().is_none_or(|re| re.is_match(&name))
        })
        .map(|(f, l)| (f, l as u32))
        .collect();
    if files.is_empty() {
        bail!("{}: its {split} split has no photos (matching the pattern)", o.run_dir.display());
    }
    Ok(files)
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The files the run trained on (resolved: links to them count), empty without `splits.csv`.
fn trained_on(run_dir: &Path, desc: &ModelDescription) -> anyhow::Result<std::collections::HashSet<PathBuf>> {
    let Some(root) = desc.dataset.as_ref() else { return Ok(Default::default()) };
    let train = modelspec::splits::photos_of(run_dir, root, &desc.classes, modelspec::splits::Split::Train)?;
    Ok(train.unwrap_or_default().iter().map(|(f, _)| canonical(f)).collect())
}

/// The network that predicts.
enum Net {
    Ort(Box<inference::OnnxModel>),
    Candle(Box<Classifier>),
}

impl Net {
    fn load(o: &EvalOptions, run_dir: &Path, dir: &ModelDir) -> anyhow::Result<(Self, String)> {
        let ort = || -> anyhow::Result<Net> {
            let desc = &dir.description;
            let weights: onnxgraph::Weights = dir
                .tensors
                .iter()
                .map(|(k, t)| Ok((k.clone(), (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))))
                .collect::<anyhow::Result<_>>()?;
            let input = modelspec::onnx_meta::InputType::Uint8;
            let props = modelspec::onnx_meta::properties(desc, input, 1, "trainer eval");
            let model = onnxgraph::build(
                desc,
                &weights,
                onnxgraph::OnnxPrecision::F32,
                input,
                &props,
                1,
                ("trainer", env!("CARGO_PKG_VERSION")),
            )?;
            let bytes = prost::Message::encode_to_vec(&model);
            let cfg = inference::SessionConfig { ort_lib: o.ort_lib.clone(), ..Default::default() };
            Ok(Net::Ort(Box::new(inference::OnnxModel::from_bytes(&bytes, &run_dir.join("<in memory>"), &cfg)?)))
        };
        let candle = || -> anyhow::Result<(Net, String)> {
            let (c, _) = Classifier::load(run_dir, &Device::Cpu)?;
            Ok((Net::Candle(Box::new(c)), "candle".into()))
        };
        let ort_name = format!("onnxruntime {}", inference::ortlib::ORT_VERSION);
        match o.engine {
            CacheEngine::Candle => candle(),
            CacheEngine::Onnxruntime => Ok((ort().context("--engine onnxruntime")?, ort_name)),
            CacheEngine::Auto => match ort() {
                Ok(n) => Ok((n, ort_name)),
                Err(e) => {
                    tracing::warn!("ONNX Runtime unavailable, evaluating with Candle: {e:#}");
                    candle()
                }
            },
        }
    }

    /// Class probabilities of `n` resized images, one row each.
    fn probabilities(&mut self, pixels: Vec<u8>, n: usize, desc: &ModelDescription) -> anyhow::Result<Vec<Vec<f32>>> {
        match self {
            Net::Ort(m) => Ok(m.run(pixels, n)?.into_iter().map(|p| p.probabilities).collect()),
            Net::Candle(c) => {
                let s = desc.input_size;
                let x = scale_pixels(&pixels, &desc.preprocessing);
                let logits = c.forward_t(&Tensor::from_vec(x, (n, s, s, 3), &Device::Cpu)?, false)?;
                Ok(candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?)
            }
        }
    }
}

/// The mean class probabilities of `n` resized images over every network (an ensemble when
/// there are several) and, with `flip`, over each image and its mirror image.
fn mean_probabilities(
    nets: &mut [Net],
    pixels: &[u8],
    n: usize,
    desc: &ModelDescription,
    flip: bool,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mirrored = flip.then(|| modelspec::preprocess::mirror_rgb(pixels, desc.input_size));
    let views: Vec<&[u8]> = std::iter::once(pixels).chain(mirrored.as_deref()).collect();
    let mut sum = vec![vec![0f32; desc.classes.len()]; n];
    for net in nets.iter_mut() {
        for v in &views {
            for (s, p) in sum.iter_mut().zip(net.probabilities(v.to_vec(), n, desc)?) {
                for (x, y) in s.iter_mut().zip(p) {
                    *x += y;
                }
            }
        }
    }
    let count = (nets.len() * views.len()) as f32;
    Ok(sum.into_iter().map(|r| r.into_iter().map(|x| x / count).collect()).collect())
}

/// The most probable class of each row (the lower index on a tie).
fn argmax_rows(p: &[Vec<f32>]) -> Vec<u32> {
    p.iter()
        .map(|r| {
            r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(i, _)| i as u32)
        })
        .collect()
}

/// Evaluates the run (or the ensemble of `run_dir` and `with`) on every folder.
pub fn evaluate(o: &EvalOptions) -> anyhow::Result<Vec<FolderReport>> {
    if let Some(s) = o.image_size.filter(|s| !(models::layers::MIN_INPUT_SIZE..=4096).contains(s)) {
        bail!("--image-size {s}: out of range ({}..=4096)", models::layers::MIN_INPUT_SIZE);
    }
    let runs: Vec<PathBuf> = std::iter::once(o.run_dir.clone()).chain(o.with.iter().cloned()).collect();
    let (mut nets, mut desc, mut engine) = (Vec::new(), None::<ModelDescription>, String::new());
    for run in &runs {
        let mut dir = ModelDir::load(run, &Device::Cpu)
            .with_context(|| format!("reading the model directory {}", run.display()))?;
        if let Some(s) = o.image_size {
            dir.description.input_size = s;
        }
        let d = dir.description.clone();
        if d.head.is_none() {
            bail!("{}: a model without a classifier head has no classes to evaluate", run.display());
        }
        if let Some(first) = &desc {
            if (&d.classes, d.input_size, &d.preprocessing) != (&first.classes, first.input_size, &first.preprocessing)
            {
                bail!(
                    "{}: its classes, input size or preprocessing differ from {}'s: not one ensemble",
                    run.display(),
                    o.run_dir.display()
                );
            }
        }
        let (net, e) = Net::load(o, run, &dir)?;
        nets.push(net);
        engine = e;
        desc.get_or_insert(d);
    }
    let desc = desc.expect("at least the first run");
    type Target = (PathBuf, Option<modelspec::splits::Split>, Vec<(PathBuf, u32)>);
    let mut targets: Vec<Target> = Vec::new();
    for folder in &o.folders {
        targets.push((folder.clone(), None, labelled_files(folder, &desc.classes, o.only.as_ref())?));
    }
    if let Some(split) = o.split {
        let name = format!("{}: its {split} split", o.run_dir.display()).into();
        targets.push((name, Some(split), run_split(o, &desc, split)?));
    }
    let trained = trained_on(&o.run_dir, &desc)?;
    let mut reports = Vec::new();
    for (folder, split, files) in &targets {
        let pb = Progress::new(files.len(), &format!("eval {}", folder.display()));
        let (mut pred, mut truth, mut paths, mut unreadable) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut probs = Vec::new();
        for chunk in files.chunks(o.batch.max(1)) {
            let sources: Vec<Source> = chunk.iter().map(|(f, _)| Source::File(f)).collect();
            let d = decode_batch(&sources, desc.input_size as u32, &desc.preprocessing, &DecodeLimits::default());
            unreadable.extend(d.failed.iter().map(|(i, e)| format!("{}: {e}", chunk[*i].0.display())));
            if !d.decoded.is_empty() {
                let p = mean_probabilities(&mut nets, &d.pixels, d.decoded.len(), &desc, o.flip)?;
                pred.extend(argmax_rows(&p));
                probs.extend(p);
                for &i in &d.decoded {
                    truth.push(chunk[i].1);
                    paths.push(chunk[i].0.clone());
                }
            }
            pb.inc(chunk.len() as u64);
        }
        pb.finish();
        let report = metrics::evaluate(&pred, &truth, &desc.classes);
        let errors = crate::report::mistakes(&paths, &truth, &pred, &probs, &desc.classes);
        let seen = files.iter().filter(|(f, _)| trained.contains(&canonical(f))).count();
        reports.push(FolderReport {
            folder: folder.clone(),
            only: o.only.as_ref().map(|r| r.as_str().to_string()),
            files: files.len(),
            unreadable,
            engine: engine.clone(),
            flip: o.flip,
            image_size: desc.input_size,
            runs: runs.clone(),
            report,
            errors,
            split: *split,
            trained_on: seen,
        });
    }
    Ok(reports)
}
