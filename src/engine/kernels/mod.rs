//! Kernel launchers, one module per `shaders/*.wgsl` family. Each module
//! holds the launchers and, in `cpu`, the plain-Rust reference the tests
//! compare against.

pub mod attention;
pub mod conv2d;
pub mod copy;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod matmul;
pub mod norm;
pub mod quantize;
pub mod reduce;
pub mod resample;
pub mod softmax;
pub mod winograd;

use anyhow::{bail, Result};

use super::device::{Binding, Gpu};
use super::tensor::Tensor;

/// Workgroups for `n` invocations of a 256-wide 1-D kernel, spread over a
/// 2-D grid when one dimension would exceed the device limit. Kernels
/// flatten it back as `gid.x + gid.y * nwg.x * 256`.
pub(crate) fn grid_1d(gpu: &Gpu, n: usize) -> Result<[u32; 3]> {
    grid_for(gpu, n, 256)
}

pub(crate) fn grid_for(gpu: &Gpu, n: usize, wg: usize) -> Result<[u32; 3]> {
    let groups = n.div_ceil(wg);
    let lim = gpu.limits.max_compute_workgroups_per_dimension as usize;
    if groups <= lim {
        return Ok([groups as u32, 1, 1]);
    }
    let y = groups.div_ceil(lim);
    if y > lim {
        bail!("{n} invocations are too many for one dispatch");
    }
    Ok([groups.div_ceil(y) as u32, y as u32, 1])
}

/// A size or index as a 32-bit kernel parameter; kernels index with u32.
pub(crate) fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| anyhow::anyhow!("{what} = {v} does not fit the kernels' 32-bit indices"))
}

/// Bind the whole allocation of a tensor (kernels that read vec4s may read
/// a little past the logical end; the pool rounds allocations up to 256 bytes).
pub(crate) fn whole(t: &Tensor) -> Binding<'_> {
    let size = (t.byte_len().div_ceil(16) * 16).min(t.buffer().size()).max(16.min(t.buffer().size()));
    Binding { buffer: t.buffer(), offset: 0, size }
}

/// Check a tensor's rank and that it is not empty.
pub(crate) fn expect_rank(what: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        bail!("{what}: expected a rank-{rank} tensor, got shape {:?}", t.shape());
    }
    t.expect_nonempty(what)
}

/// Deterministic pseudo-random numbers for tests and benchmarks.
pub fn random_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}
