//! taming-wgpu: Taming Transformers (VQGAN + GPT) on a hand-written wgpu
//! compute engine.
//!
//! Layers, bottom up:
//! - [`engine`]: device, buffers, tensors and the WGSL kernels (each with a CPU reference);
//! - [`workflows`]: what the `taming` command runs (info, bench).

pub mod engine;
pub mod models;
pub mod workflows;
