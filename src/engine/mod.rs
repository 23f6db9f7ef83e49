//! The compute engine: device and per-adapter tuning, buffer and texture pools, tensors, shaders,
//! kernels, the autodiff tape, optimizers, and the self-checks of every kernel on the device.

pub mod autotune;
pub mod check;
pub mod device;
pub mod distributed;
pub mod kernels;
pub mod optim;
pub mod params;
pub mod pool;
pub mod rng;
pub mod shaders;
pub mod tape;
pub mod tensor;
pub mod tiles;

pub use check::verdict::{open, open_for_training};
pub use device::{DeviceRequest, Gpu, Tuning};
pub use rng::Rng;
pub use tape::{Tape, Var};
pub use tensor::{DType, Tensor};
