//! Checkpoint weights: one or more memory-mapped safetensors files (a single
//! `model.safetensors` or the shards of `model.safetensors.index.json`), read
//! tensor by tensor with the shape and dtype checked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::ModelError;

pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Tensor name -> index into `files`.
    routing: HashMap<String, usize>,
}

impl Weights {
    /// Opens the weights of a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        Self::open(&safetensors_files(dir)?)
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
        Ok(Weights { files, routing })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// Loads tensor `name`, checks its shape, and converts it to `dtype`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor, ModelError> {
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
        let t = st.load(name, &Device::Cpu)?;
        Ok(if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        })
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

/// candle wraps errors with context; people want the innermost reason.
fn root_cause(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithPath { inner, .. } => root_cause(inner),
        candle_core::Error::Context { inner, .. } => root_cause(inner),
        other => other.to_string(),
    }
}
