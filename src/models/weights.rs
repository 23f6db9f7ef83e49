//! Model files: one `.safetensors` per model, tensor names as the reference
//! state_dict, `"format": "taming"` and the reference config (JSON) in the
//! metadata (see SPEC.md). Loading checks every tensor a model asks for:
//! present, with the shape its config implies, F32 or F16.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use half::f16;
use safetensors::{Dtype, SafeTensors};

use crate::engine::{Gpu, Tape, Tensor, Var};

/// Host copy of a model file.
pub struct ModelFile {
    pub path: PathBuf,
    bytes: Vec<u8>,
    /// The reference config's JSON (`target`, `params`), from the metadata.
    pub config: serde_json::Value,
    /// The header, parsed once: name -> dtype, shape, byte range.
    header: safetensors::tensor::Metadata,
    /// Where the tensor data starts in `bytes`.
    data_start: usize,
}

/// A tensor's entry in the file: type, shape and bytes.
struct Entry<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl ModelFile {
    pub fn open(path: &Path) -> Result<ModelFile> {
        let f = Self::open_tensors(path)?;
        if f.config.is_null() {
            bail!("{}: no 'config' in the metadata; convert the checkpoint with tools/convert_taming.py", path.display());
        }
        Ok(f)
    }

    /// A safetensors file without the model metadata (e.g. a reference dump).
    pub fn open_tensors(path: &Path) -> Result<ModelFile> {
        let bytes = std::fs::read(path).with_context(|| format!("reading model file {}", path.display()))?;
        let (header_len, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow!("{}: not a valid safetensors file ({e:?})", path.display()))?;
        // Full validation (offsets within the file, no overlaps) once, here.
        SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: not a valid safetensors file ({e:?})", path.display()))?;
        let md = meta.metadata().clone().unwrap_or_default();
        let config = match md.get("config") {
            Some(c) => serde_json::from_str(c).with_context(|| format!("{}: metadata 'config' is not JSON", path.display()))?,
            None => serde_json::Value::Null,
        };
        Ok(ModelFile { path: path.to_path_buf(), bytes, config, header: meta, data_start: 8 + header_len })
    }

    fn entry(&self, name: &str) -> Result<Entry<'_>> {
        let info = self.header.info(name).ok_or_else(|| anyhow!("{}: missing tensor '{name}'", self.path.display()))?;
        let (a, b) = info.data_offsets;
        Ok(Entry { dtype: info.dtype, shape: &info.shape, data: &self.bytes[self.data_start + a..self.data_start + b] })
    }

    pub fn names(&self) -> Vec<String> {
        self.header.tensors().into_keys().collect()
    }

    pub fn has(&self, name: &str) -> bool {
        self.header.info(name).is_some()
    }

    /// A tensor as f32 host data, checked against `shape` when given.
    pub fn host(&self, name: &str, shape: Option<&[usize]>) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.entry(name)?;
        if let Some(s) = shape {
            if t.shape != s {
                bail!("{}: tensor '{name}' has shape {:?}, the config implies {:?}", self.path.display(), t.shape, s);
            }
        }
        let data = match t.dtype {
            Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(t.data),
            Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(t.data).iter().map(|v| v.to_f32()).collect(),
            Dtype::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(t.data).iter().map(|&v| v as f32).collect(),
            other => bail!("{}: tensor '{name}' has unsupported type {other:?} (F32 or F16 expected)", self.path.display()),
        };
        Ok((data, t.shape.to_vec()))
    }

    /// Integer tensor (I64 indices) as u32.
    pub fn indices(&self, name: &str) -> Result<(Vec<u32>, Vec<usize>)> {
        let t = self.entry(name)?;
        match t.dtype {
            Dtype::I64 => Ok((bytemuck::pod_collect_to_vec::<u8, i64>(t.data).iter().map(|&v| v as u32).collect(), t.shape.to_vec())),
            other => bail!("{}: tensor '{name}' is {other:?}, expected I64 indices", self.path.display()),
        }
    }

    pub fn upload(&self, gpu: &Arc<Gpu>, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (data, _) = self.host(name, Some(shape))?;
        Tensor::from_f32(gpu, &data, shape)
    }
}

/// A model's parameters on the GPU, by reference name.
#[derive(Default)]
pub struct Params {
    pub tensors: HashMap<String, Tensor>,
    /// Names in the order they were loaded (for optimizers and checkpoints).
    pub order: Vec<String>,
}

impl Params {
    pub fn load(&mut self, file: &ModelFile, gpu: &Arc<Gpu>, name: &str, shape: &[usize]) -> Result<()> {
        self.load_prefixed(file, gpu, "", name, shape)
    }

    /// Load `{prefix}{name}` from the file and keep it under `name` (a
    /// submodule's parameters inside a larger model file).
    pub fn load_prefixed(&mut self, file: &ModelFile, gpu: &Arc<Gpu>, prefix: &str, name: &str, shape: &[usize]) -> Result<()> {
        let t = file.upload(gpu, &format!("{prefix}{name}"), shape)?;
        self.order.push(name.to_string());
        self.tensors.insert(name.to_string(), t);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| anyhow!("internal: parameter '{name}' was not loaded"))
    }

    /// Leaves on `tape` for every parameter.
    pub fn vars(&self, tape: &Tape) -> ParamVars {
        ParamVars { vars: self.order.iter().map(|n| (n.clone(), tape.leaf(self.tensors[n].clone()))).collect() }
    }
}

/// Parameters as tape variables.
pub struct ParamVars {
    pub vars: HashMap<String, Var>,
}

impl ParamVars {
    pub fn get(&self, name: &str) -> Result<&Var> {
        self.vars.get(name).ok_or_else(|| anyhow!("internal: parameter '{name}' is not on the tape"))
    }
}
