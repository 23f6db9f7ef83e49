use taming::engine::kernels::{random_vec, winograd};
use taming::engine::{DeviceRequest, Gpu, Tensor};
fn main() {
    let gpu = Gpu::new(&DeviceRequest::from_env()).unwrap();
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (b, c, h) = (args[0], args[1], args[2]);
    let x = Tensor::from_f32(&gpu, &random_vec(b * c * h * h, 1, 1.0), &[b, c, h, h]).unwrap();
    let w = Tensor::from_f32(&gpu, &random_vec(c * c * 9, 2, 1.0), &[c, c, 3, 3]).unwrap();
    let out = Tensor::empty(&gpu, &[b, c, h, h], taming::engine::DType::F32).unwrap();
    for _ in 0..20 {
        winograd::conv3x3(&x, None, &w, None, None, &out).unwrap();
    }
    gpu.sync().unwrap();
}
