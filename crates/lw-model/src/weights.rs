//! Checkpoint weights: one or more memory-mapped safetensors files (a single
//! `model.safetensors` or the shards of `model.safetensors.index.json`), read
//! tensor by tensor with the shape and dtype checked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, WeightLayout};
use crate::error::ModelError;

pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Tensor name -> index into `files`.
    routing: HashMap<String, usize>,
    /// Name the model asks for -> name stored in the file, where they differ.
    aliases: HashMap<String, String>,
}

impl Weights {
    /// Opens the weights of a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        Self::open(&safetensors_files(dir)?)
    }

    /// Opens the weights of a model directory whose config is `cfg`, with
    /// tensors of other layouts (original ChatGLM) known by their
    /// `transformers` names.
    pub fn for_config(dir: &Path, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let mut w = Self::from_dir(dir)?;
        match cfg.layout {
            WeightLayout::ChatGlm => w.rename(crate::config::chatglm_to_hf),
            WeightLayout::Gemma => w.rename(crate::config::gemma_to_slots),
            WeightLayout::Hf => {}
        }
        Ok(w)
    }

    /// Makes each stored tensor that `canonical` maps also known by the
    /// name it returns.
    pub fn rename(&mut self, canonical: impl Fn(&str) -> Option<String>) {
        for stored in self.routing.keys() {
            if let Some(name) = canonical(stored) {
                self.aliases.insert(name, stored.clone());
            }
        }
    }

    fn stored_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.aliases.get(name).map_or(name, String::as_str)
    }

    /// Memory-maps the given safetensors files and reads their headers.
    pub fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            if !path.exists() {
                return Err(ModelError::io(
                    path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                ));
            }
            // SAFETY: the file is mapped read-only; like every mmap-based loader we
            // rely on nobody truncating the checkpoint while it is being read.
            let st =
                unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    reason: root_cause(&e),
                })?;
            for (name, _) in st.tensors() {
                routing.insert(name, index);
            }
            files.push((path.clone(), st));
        }
        Ok(Weights {
            files,
            routing,
            aliases: HashMap::new(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(self.stored_name(name))
    }

    /// Loads tensor `name`, checks its shape, and converts it to `dtype`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor, ModelError> {
        self.get_stacked(&[(name, shape)], dtype)
    }

    /// Loads several tensors with the same trailing dimensions, checks each
    /// shape, and stacks them along the first dimension in one buffer of
    /// `dtype` (fused projections: one matvec instead of several).
    pub fn get_stacked(
        &self,
        parts: &[(&str, &[usize])],
        dtype: DType,
    ) -> Result<Tensor, ModelError> {
        let mut views = Vec::with_capacity(parts.len());
        for &(name, shape) in parts {
            views.push(self.view(name, shape)?);
        }
        let n: usize = views
            .iter()
            .map(|(b, st)| b.len() / st.size_in_bytes())
            .sum();
        let widened = || views.iter().flat_map(|&(b, st)| widen_all(b, st));
        let all_stored = |d: DType| views.iter().all(|&(_, st)| st == d);
        let raw = || views.iter().flat_map(|&(b, _)| raw_u16(b));
        let mut shape = parts[0].1.to_vec();
        shape[0] = parts.iter().map(|p| p.1[0]).sum();
        let dev = &Device::Cpu;
        // One pass from the mapped file into a fresh buffer of the target dtype.
        let t = match dtype {
            DType::F32 => Tensor::from_vec(fill(n, widened()), shape, dev)?,
            DType::BF16 if all_stored(DType::BF16) => {
                Tensor::from_vec(fill(n, raw().map(half::bf16::from_bits)), shape, dev)?
            }
            DType::F16 if all_stored(DType::F16) => {
                Tensor::from_vec(fill(n, raw().map(half::f16::from_bits)), shape, dev)?
            }
            DType::BF16 => {
                Tensor::from_vec(fill(n, widened().map(half::bf16::from_f32)), shape, dev)?
            }
            DType::F16 => {
                Tensor::from_vec(fill(n, widened().map(half::f16::from_f32)), shape, dev)?
            }
            other => {
                return Err(
                    candle_core::Error::Msg(format!("weights cannot be held as {other:?}")).into(),
                )
            }
        };
        for (bytes, _) in &views {
            release_pages(bytes);
        }
        Ok(t)
    }

    /// The bytes and stored dtype of tensor `name`, its shape and dtype checked.
    fn view(&self, name: &str, shape: &[usize]) -> Result<(&[u8], DType), ModelError> {
        let name = self.stored_name(name);
        let index = *self
            .routing
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                files: self
                    .files
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let (path, st) = &self.files[index];
        let view = st.get(name).map_err(ModelError::Candle)?;
        if view.shape() != shape {
            return Err(ModelError::Shape {
                name: name.to_string(),
                path: path.clone(),
                actual: view.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        use safetensors::Dtype as S;
        if !matches!(view.dtype(), S::F32 | S::F16 | S::BF16) {
            return Err(ModelError::Dtype {
                name: name.to_string(),
                path: path.clone(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        let stored = DType::try_from(view.dtype())?;
        Ok((view.data(), stored))
    }

    /// The dtype most of the large tensors are stored in.
    pub fn stored_dtype(&self) -> DType {
        let mut count: HashMap<DType, usize> = HashMap::new();
        for (_, st) in &self.files {
            for (_, view) in st.tensors() {
                if let Ok(dt) = DType::try_from(view.dtype()) {
                    *count.entry(dt).or_default() += view.data().len();
                }
            }
        }
        count
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(dt, _)| dt)
            .unwrap_or(DType::F32)
    }
}

/// The safetensors files of a model directory: the shards named by
/// `model.safetensors.index.json`, or `model.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: index.clone(),
                reason: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Config {
                path: index.clone(),
                reason: "no `weight_map` object".into(),
            })?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::io(
        &single,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no model.safetensors or model.safetensors.index.json in the model directory",
        ),
    ))
}

fn raw_u16(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
}

/// Little-endian f32 / f16 / bf16 bytes as f32 values.
fn widen_all(bytes: &[u8], stored: DType) -> Box<dyn Iterator<Item = f32> + '_> {
    match stored {
        DType::F32 => Box::new(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::BF16 => Box::new(raw_u16(bytes).map(|b| half::bf16::from_bits(b).to_f32())),
        _ => Box::new(raw_u16(bytes).map(|b| half::f16::from_bits(b).to_f32())),
    }
}

/// A buffer of `n` values backed by transparent huge pages where the kernel
/// offers them: decoding streams every weight once per token, and 2 MiB pages
/// spare the TLB a miss every 4 KiB.
fn fill<T>(n: usize, values: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    crate::mmap::advise_huge_pages(v.as_mut_ptr() as usize, n * std::mem::size_of::<T>());
    v.extend(values.take(n));
    v
}

/// The copy is made: let the kernel drop the mapped file pages, so peak
/// memory stays near one copy of the weights instead of two.
#[cfg(target_os = "linux")]
fn release_pages(bytes: &[u8]) {
    let page = 4096;
    let start = bytes.as_ptr() as usize;
    let begin = start.div_ceil(page) * page;
    let end = (start + bytes.len()) / page * page;
    if end > begin {
        // SAFETY: a read-only private file mapping; dropped pages are read
        // back from the file if touched again.
        unsafe {
            libc::madvise(begin as *mut libc::c_void, end - begin, libc::MADV_DONTNEED);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn release_pages(_bytes: &[u8]) {}

/// candle wraps errors with context; people want the innermost reason.
fn root_cause(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithPath { inner, .. } => root_cause(inner),
        candle_core::Error::Context { inner, .. } => root_cause(inner),
        other => other.to_string(),
    }
}
