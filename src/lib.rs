//! taming-wgpu: Taming Transformers (VQGAN + GPT) on a hand-written wgpu
//! compute engine.
//!
//! Layers, bottom up:
//! - [`engine`]: the device and its per-adapter kernel choices (`Tuning`), storage-buffer and
//!   texture pools, tensors, the WGSL kernels (each with a CPU reference), typed kernel
//!   parameters, the tape (reverse-mode autodiff) and the Adam/AdamW optimizers, and the
//!   self-checks that compare every kernel with its reference on the device at hand
//!   (`engine::check`);
//! - [`models`]: VQGAN (Encoder, quantizer, Decoder), LPIPS, PatchGAN, the VQGAN loss, GPT, the
//!   Net2NetTransformer conditioning and loss, model files;
//! - [`workflows`]: what the `taming` command runs (info, check, verify,
//!   reconstruct/encode/decode, training data, train-vqgan, train-transformer, export-half, sample,
//!   bench).
//!
//! Design notes and measurements live in the module docs: `engine::kernels` (an overview of the
//! device the kernels were tuned on, compile time, how figures were measured) and each kernel
//! module under it, `engine::tape` (autodiff), `models::gpt` (token-by-token decoding) and
//! `models::vqgan` (the speed of the VQGAN forward and training steps).

pub mod engine;
pub mod models;
pub mod workflows;
