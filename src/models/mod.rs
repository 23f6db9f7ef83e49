//! The models of the method, built from the engine's differentiable ops and
//! named like the reference implementation's modules and parameters.

pub mod channel_runs;
pub mod classifier;
pub mod cond_transformer;
pub mod config_keys;
pub mod discriminator;
pub mod gpt;
pub mod lpips;
pub mod permuter;
pub mod vqgan;
pub mod vqloss;
pub mod weights;
