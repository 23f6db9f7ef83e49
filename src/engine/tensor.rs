//! GPU tensors: a pooled storage buffer plus a shape and an element type.
//! Tensors are immutable values as far as users go; kernels write only into
//! tensors they have just allocated (or, for accumulation, that the caller owns).

use std::sync::Arc;

use anyhow::{bail, Result};
use half::f16;

use super::device::{Binding, Gpu};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    /// Half-precision storage, packed two per 32-bit word (`unpack2x16float`
    /// in WGSL), so it works on every device; kernels compute in f32.
    F16,
    /// Indices (codebook entries, tokens, class labels).
    U32,
}

impl DType {
    pub fn bytes_for(self, n: usize) -> u64 {
        match self {
            DType::F32 | DType::U32 => 4 * n as u64,
            DType::F16 => 2 * n.div_ceil(2) as u64 * 2,
        }
    }
}

/// A pooled buffer; it goes back to the pool when the last tensor using it drops.
pub struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    gpu: Arc<Gpu>,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.gpu.pool.give_back(b);
        }
    }
}

#[derive(Clone)]
pub struct Tensor {
    pub gpu: Arc<Gpu>,
    buf: Arc<PooledBuffer>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.shape, self.dtype)
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// An uninitialised tensor (contents are whatever the pooled buffer held).
    pub fn empty(gpu: &Arc<Gpu>, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n = numel(shape);
        let bytes = dtype.bytes_for(n);
        let buffer = gpu
            .pool
            .take(bytes, gpu.max_buffer(), || gpu.make_room())
            .map_err(|e| anyhow::anyhow!("tensor {shape:?} {dtype:?}: {e}"))?;
        Ok(Tensor {
            gpu: gpu.clone(),
            buf: Arc::new(PooledBuffer { buffer: Some(buffer), gpu: gpu.clone() }),
            shape: shape.to_vec(),
            dtype,
        })
    }

    pub fn zeros(gpu: &Arc<Gpu>, shape: &[usize]) -> Result<Tensor> {
        let t = Tensor::empty(gpu, shape, DType::F32)?;
        t.fill_zero();
        Ok(t)
    }

    /// Zero the tensor's bytes, in order with recorded kernels.
    pub fn fill_zero(&self) {
        self.gpu.clear(self.buffer(), 0, self.byte_len().div_ceil(4) * 4);
    }

    fn check_len(shape: &[usize], len: usize) -> Result<()> {
        if numel(shape) != len {
            bail!("tensor data has {len} elements but shape {shape:?} needs {}", numel(shape));
        }
        Ok(())
    }

    pub fn from_f32(gpu: &Arc<Gpu>, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        Self::check_len(shape, data.len())?;
        let t = Tensor::empty(gpu, shape, DType::F32)?;
        if !data.is_empty() {
            gpu.write_bytes(t.buffer(), 0, bytemuck::cast_slice(data));
        }
        Ok(t)
    }

    pub fn from_u32(gpu: &Arc<Gpu>, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        Self::check_len(shape, data.len())?;
        let t = Tensor::empty(gpu, shape, DType::U32)?;
        if !data.is_empty() {
            gpu.write_bytes(t.buffer(), 0, bytemuck::cast_slice(data));
        }
        Ok(t)
    }

    pub fn from_f16(gpu: &Arc<Gpu>, data: &[f16], shape: &[usize]) -> Result<Tensor> {
        Self::check_len(shape, data.len())?;
        let t = Tensor::empty(gpu, shape, DType::F16)?;
        let mut words: Vec<f16> = data.to_vec();
        if words.len() % 2 == 1 {
            words.push(f16::ZERO);
        }
        if !words.is_empty() {
            gpu.write_bytes(t.buffer(), 0, bytemuck::cast_slice(&words));
        }
        Ok(t)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Size of dimension `d`; negative counts from the end.
    pub fn dim(&self, d: isize) -> usize {
        let r = self.shape.len() as isize;
        self.shape[(if d < 0 { r + d } else { d }) as usize]
    }
    pub fn byte_len(&self) -> u64 {
        self.dtype.bytes_for(self.numel())
    }
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buf.buffer.as_ref().unwrap()
    }
    pub fn binding(&self) -> Binding<'_> {
        Binding { buffer: self.buffer(), offset: 0, size: self.byte_len().max(4) }
    }
    /// Same buffer, new shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            bail!("cannot reshape {:?} ({} elements) to {:?}", self.shape, self.numel(), shape);
        }
        Ok(Tensor { gpu: self.gpu.clone(), buf: self.buf.clone(), shape: shape.to_vec(), dtype: self.dtype })
    }
    /// Whether this is the only handle on its storage (no clone or reshape of it lives), so an
    /// op may overwrite it.
    pub fn is_sole_owner(&self) -> bool {
        Arc::strong_count(&self.buf) == 1
    }
    /// Two tensors are the same storage.
    pub fn same_buffer(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf)
    }

    pub fn expect_dtype(&self, what: &str, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            bail!("{what}: expected {dtype:?} tensor, got {:?} of shape {:?}", self.dtype, self.shape);
        }
        Ok(())
    }
    pub fn expect_shape(&self, what: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            bail!("{what}: expected shape {shape:?}, got {:?}", self.shape);
        }
        Ok(())
    }
    pub fn expect_nonempty(&self, what: &str) -> Result<()> {
        if self.numel() == 0 {
            bail!("{what}: empty tensor of shape {:?}", self.shape);
        }
        Ok(())
    }

    /// Read back as f32 (F16 is widened; U32 is converted).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        let bytes = self.gpu.read_bytes(self.buffer(), 0, self.byte_len())?;
        Ok(match self.dtype {
            DType::F32 => bytemuck::cast_slice::<u8, f32>(&bytes).to_vec(),
            DType::U32 => bytemuck::cast_slice::<u8, u32>(&bytes).iter().map(|&v| v as f32).collect(),
            DType::F16 => bytemuck::cast_slice::<u8, f16>(&bytes)[..self.numel()].iter().map(|v| v.to_f32()).collect(),
        })
    }

    pub fn to_u32_vec(&self) -> Result<Vec<u32>> {
        self.expect_dtype("to_u32_vec", DType::U32)?;
        let bytes = self.gpu.read_bytes(self.buffer(), 0, self.byte_len())?;
        Ok(bytemuck::cast_slice::<u8, u32>(&bytes).to_vec())
    }

    pub fn to_scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            bail!("to_scalar on a tensor of shape {:?}", self.shape);
        }
        Ok(self.to_vec()?[0])
    }
}

impl Gpu {
    pub fn clear(&self, buf: &wgpu::Buffer, offset: u64, size: u64) {
        self.record(|enc| enc.clear_buffer(buf, offset, Some(size)));
    }
}
