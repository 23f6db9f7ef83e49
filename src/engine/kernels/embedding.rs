//! Embedding gather (`shaders/embedding.wgsl`).

use anyhow::{bail, Result};

use super::{expect_rank, grid_1d, plane_runs, plane_window, u32_of};
use crate::engine::device::Gpu;
use crate::engine::tensor::{DType, Tensor};

crate::kernel_params!(
    /// `shaders/embedding.wgsl`'s `Params`: ids, row width, table rows; the dispatch's window of
    /// table rows (its ids are bound from its first).
    EmbeddingParams in "embedding" as "Params" {
        n: u32, d: u32, rows: u32, r0: u32,
        r_count: u32, _pad0: u32, _pad1: u32, _pad2: u32,
    }
);

/// table [rows, D], ids (host) -> [ids.len(), D]. Ids are checked here, where they are known.
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    embedding_gpu(table, &ids_on_device(table, ids)?)
}

/// `ids` [N] uploaded for `embedding_gpu`, after checking each is a row of `table`.
pub fn ids_on_device(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    expect_rank("embedding table", table, 2)?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= table.dim(0)) {
        bail!("embedding: id {bad} is out of range for a table of {} rows", table.dim(0));
    }
    Tensor::from_u32(&table.gpu, ids, &[ids.len()])
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
    windowed(gpu, ids, rows, d, |params, id_run, table_run| {
        let bindings = [plane_window(ids, 1, id_run), plane_window(table, d, table_run), plane_window(&out, d, id_run)];
        gpu.dispatch(&pipe, &params, &bindings, grid_1d(gpu, id_run.1 * d)?)
    })?;
    Ok(out)
}

/// Runs `dispatch(params, ids run, table rows run)` for every pair of a run of ids and a run of
/// table rows (one pair unless a table, the ids or an output is larger than one storage binding).
fn windowed(
    gpu: &Gpu,
    ids: &Tensor,
    rows: usize,
    d: usize,
    mut dispatch: impl FnMut(EmbeddingParams, (usize, usize), (usize, usize)) -> Result<()>,
) -> Result<()> {
    let n = ids.numel();
    for table_run @ (r0, r_count) in plane_runs(gpu, rows, &[d], 1)? {
        for id_run @ (_, count) in plane_runs(gpu, n, &[d, 1], 1)? {
            let params = EmbeddingParams {
                n: u32_of("ids", count)?,
                d: u32_of("width", d)?,
                rows: u32_of("rows", rows)?,
                r0: u32_of("row", r0)?,
                r_count: u32_of("rows", r_count)?,
                ..Default::default()
            };
            dispatch(params, id_run, table_run)?;
        }
    }
    Ok(())
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
    windowed(gpu, ids, rows, d, |params, (n0, count), table_run| {
        // Each invocation loops over the ids of its dispatch: runs of at most LOOP_ITERATIONS
        // ids (lavapipe silently ends longer loops), added in order.
        for s in (0..count).step_by(super::LOOP_ITERATIONS) {
            let run = (n0 + s, super::LOOP_ITERATIONS.min(count - s));
            let p = EmbeddingParams { n: u32_of("ids", run.1)?, ..params };
            let bindings = [plane_window(ids, 1, run), plane_window(dout, d, run), plane_window(&dtable, d, table_run)];
            gpu.dispatch(&pipe, &p, &bindings, super::grid_for(gpu, d, 64)?)?;
        }
        Ok(())
    })?;
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
