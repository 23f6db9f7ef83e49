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
            bail!(
                "{}: no 'config' in the metadata; convert the checkpoint with tools/convert_taming.py",
                path.display()
            );
        }
        Ok(f)
    }

    /// A safetensors file without the model metadata (e.g. a reference dump).
    pub fn open_tensors(path: &Path) -> Result<ModelFile> {
        let bytes = std::fs::read(path).with_context(|| format!("reading model file {}", path.display()))?;
        let (header_len, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow!("{}: not a valid safetensors file ({e:?})", path.display()))?;
        // Full validation (offsets within the file, no overlaps) once, here.
        SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow!("{}: not a valid safetensors file ({e:?})", path.display()))?;
        let md = meta.metadata().clone().unwrap_or_default();
        let config = match md.get("config") {
            Some(c) => {
                serde_json::from_str(c).with_context(|| format!("{}: metadata 'config' is not JSON", path.display()))?
            }
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

    /// The tensor is stored in half precision.
    pub fn is_half(&self, name: &str) -> bool {
        self.header.info(name).is_some_and(|i| i.dtype == Dtype::F16)
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
            other => {
                bail!("{}: tensor '{name}' has unsupported type {other:?} (F32 or F16 expected)", self.path.display())
            }
        };
        Ok((data, t.shape.to_vec()))
    }

    /// Integer tensor (I64 indices) as u32.
    pub fn indices(&self, name: &str) -> Result<(Vec<u32>, Vec<usize>)> {
        let t = self.entry(name)?;
        match t.dtype {
            Dtype::I64 => Ok((
                bytemuck::pod_collect_to_vec::<u8, i64>(t.data).iter().map(|&v| v as u32).collect(),
                t.shape.to_vec(),
            )),
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
    pub fn load_prefixed(
        &mut self,
        file: &ModelFile,
        gpu: &Arc<Gpu>,
        prefix: &str,
        name: &str,
        shape: &[usize],
    ) -> Result<()> {
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

    /// Constants on `tape` (frozen: no gradient is computed for them).
    pub fn constants(&self, tape: &Tape) -> ParamVars {
        ParamVars { vars: self.order.iter().map(|n| (n.clone(), tape.constant(self.tensors[n].clone()))).collect() }
    }

    /// Add a parameter made on the host.
    pub fn insert(&mut self, gpu: &Arc<Gpu>, name: &str, data: &[f32], shape: &[usize]) -> Result<()> {
        let t = Tensor::from_f32(gpu, data, shape)?;
        if self.tensors.insert(name.to_string(), t).is_none() {
            self.order.push(name.to_string());
        }
        Ok(())
    }

    /// Every parameter read back, named `{prefix}{name}`, in load order.
    pub fn to_host(&self, prefix: &str) -> Result<Vec<HostTensor>> {
        self.order
            .iter()
            .map(|n| {
                let t = &self.tensors[n];
                Ok(HostTensor {
                    name: format!("{prefix}{n}"),
                    shape: t.shape().to_vec(),
                    data: HostData::F32(t.to_vec()?),
                })
            })
            .collect()
    }
}

/// Tensor data on the host, for writing files.
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: HostData,
}

/// Write `bytes` to `path` atomically: a temp file beside it, synced, then renamed
/// over the target, so a killed process leaves either the old or the new file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp_name = path.file_name().ok_or_else(|| anyhow!("{}: not a file path", path.display()))?.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("writing {}: {e}", path.display())
    })
}

/// A safetensors file with `metadata`, written atomically. `half` stores F32 tensors as F16.
pub fn write_safetensors(
    path: &Path,
    tensors: &[HostTensor],
    metadata: HashMap<String, String>,
    half: bool,
) -> Result<()> {
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let (dtype, data) = match &t.data {
                HostData::F32(v) if half => (
                    Dtype::F16,
                    bytemuck::cast_slice::<f16, u8>(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).to_vec(),
                ),
                HostData::F32(v) => (Dtype::F32, bytemuck::cast_slice::<f32, u8>(v).to_vec()),
                HostData::I64(v) => (Dtype::I64, bytemuck::cast_slice::<i64, u8>(v).to_vec()),
            };
            (t.name.clone(), dtype, t.shape.clone(), data)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| anyhow!("{}: tensor '{n}': {e:?}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let out =
        safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| anyhow!("{}: {e:?}", path.display()))?;
    write_atomically(path, &out)
}

/// A model file in the SPEC format: reference names, `"format": "taming"`, the model config.
pub fn write_model_file(path: &Path, config: &serde_json::Value, tensors: &[HostTensor], half: bool) -> Result<()> {
    let metadata =
        HashMap::from([("format".to_string(), "taming".to_string()), ("config".to_string(), config.to_string())]);
    write_safetensors(path, tensors, metadata, half)
}

impl ModelFile {
    /// The file's metadata entry `key` (other than the config).
    pub fn metadata(&self, key: &str) -> Option<String> {
        self.header.metadata().as_ref().and_then(|m| m.get(key).cloned())
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

    /// The gradients of the parameters `order` (an optimizer's order); zeros
    /// for a parameter the loss does not reach.
    pub fn gradients(&self, order: &[String], grads: &crate::engine::tape::Gradients) -> Result<Vec<Tensor>> {
        order
            .iter()
            .map(|n| {
                let v = self.get(n)?;
                match grads.get(v) {
                    Some(g) => Ok(g.clone()),
                    None => Tensor::zeros(&v.value.gpu, v.shape()),
                }
            })
            .collect()
    }
}
