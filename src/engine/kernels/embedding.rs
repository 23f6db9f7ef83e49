//! Embedding gather (`shaders/embedding.wgsl`).

use anyhow::{bail, Result};

use super::{expect_rank, grid_1d, u32_of};
use crate::engine::tensor::{DType, Tensor};

crate::kernel_params!(
    /// `shaders/embedding.wgsl`'s `Params`: ids, row width, table rows.
    EmbeddingParams in "embedding" as "Params" { n: u32, d: u32, rows: u32, _pad0: u32 }
);

/// table [rows, D], ids (host) -> [ids.len(), D]. Ids are checked here, where they are known.
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    expect_rank("embedding table", table, 2)?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= table.dim(0)) {
        bail!("embedding: id {bad} is out of range for a table of {} rows", table.dim(0));
    }
    let idt = Tensor::from_u32(&table.gpu, ids, &[ids.len()])?;
    embedding_gpu(table, &idt)
}

/// Gather with ids already on the GPU (out-of-range ids read the last row).
pub fn embedding_gpu(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    table.expect_dtype("embedding table", DType::F32)?;
    ids.expect_dtype("embedding ids", DType::U32)?;
    let (rows, d) = (table.dim(0), table.dim(1));
    let n = ids.numel();
    let out = Tensor::empty(&table.gpu, &[n, d], DType::F32)?;
    if n == 0 {
        return Ok(out);
    }
    let gpu = &table.gpu;
    let pipe = gpu.pipeline("embedding", "gather", &[])?;
    let params = EmbeddingParams {
        n: u32_of("ids", n)?,
        d: u32_of("width", d)?,
        rows: u32_of("rows", rows)?,
        ..Default::default()
    };
    gpu.dispatch(&pipe, &params, &[ids.binding(), table.binding(), out.binding()], grid_1d(gpu, n * d)?)?;
    Ok(out)
}

/// Gradient of the table: dtable[ids[n]] += dout[n] (rows of width D).
pub fn embedding_backward(ids: &Tensor, dout: &Tensor, rows: usize) -> Result<Tensor> {
    ids.expect_dtype("embedding ids", DType::U32)?;
    let d = dout.dim(-1);
    let n = ids.numel();
    if dout.numel() != n * d {
        bail!("embedding backward: gradient {:?} does not match {n} ids", dout.shape());
    }
    let gpu = &dout.gpu;
    let dtable = Tensor::zeros(gpu, &[rows, d])?;
    if n == 0 {
        return Ok(dtable);
    }
    let pipe = gpu.pipeline("embedding", "scatter_add", &[])?;
    let params = EmbeddingParams {
        n: u32_of("ids", n)?,
        d: u32_of("width", d)?,
        rows: u32_of("rows", rows)?,
        ..Default::default()
    };
    gpu.dispatch(&pipe, &params, &[ids.binding(), dout.binding(), dtable.binding()], super::grid_for(gpu, d, 64)?)?;
    Ok(dtable)
}

pub mod cpu {
    pub fn embedding_backward(ids: &[u32], g: &[f32], rows: usize, d: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * d];
        for (n, &id) in ids.iter().enumerate() {
            for j in 0..d {
                out[id as usize * d + j] += g[n * d + j];
            }
        }
        out
    }

    pub fn embedding(table: &[f32], d: usize, ids: &[u32]) -> Vec<f32> {
        ids.iter().flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].to_vec()).collect()
    }
}
