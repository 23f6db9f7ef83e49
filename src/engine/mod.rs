//! The compute engine: device and buffer pool, tensors, shaders, kernels.

pub mod device;
pub mod kernels;
pub mod pool;
pub mod shaders;
pub mod tensor;

pub use device::{DeviceRequest, Gpu};
pub use tensor::{DType, Tensor};
