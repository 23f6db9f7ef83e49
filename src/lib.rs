//! taming-wgpu: Taming Transformers (VQGAN + GPT) on a hand-written wgpu
//! compute engine.
//!
//! Layers, bottom up:
//! - [`engine`]: device, buffers, tensors, the WGSL kernels (each with a CPU
//!   reference), the tape and optimizers, and the self-checks that compare
//!   every kernel with its reference on the device at hand (`engine::check`);
//! - [`models`]: VQGAN, LPIPS, PatchGAN, the VQGAN loss, GPT, model files;
//! - [`workflows`]: what the `taming` command runs (info, check, verify,
//!   reconstruct/encode/decode, train, sample, bench).

pub mod engine;
pub mod models;
pub mod workflows;
