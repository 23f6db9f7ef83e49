//! Typed uniform parameters: one `#[repr(C)]` struct per WGSL parameter
//! struct, with the same field names in the same order, declared with
//! `kernel_params!` beside the launcher that fills it. `Gpu::dispatch` takes
//! only these, so a launcher names every word it writes; `tests/shaders.rs`
//! reads each WGSL struct through naga and checks its fields' names, offsets
//! and sizes against the Rust one (`registry`).

/// A field of a parameter struct: (name, byte offset, byte size).
pub type Field = (&'static str, usize, usize);

/// A uniform parameter block of one WGSL struct.
pub trait KernelParams: bytemuck::Pod {
    /// The shader file (`shaders/<name>.wgsl`) and the WGSL struct's name.
    const WGSL: (&'static str, &'static str);
    fn fields() -> Vec<Field>;
}

/// `kernel_params!(Name in "shader" as "WgslStruct" { field: u32, ... })`:
/// the struct (Pod, Default) and its `KernelParams`.
#[macro_export]
macro_rules! kernel_params {
    ($(#[$meta:meta])* $name:ident in $shader:literal as $wgsl:literal { $($(#[$fmeta:meta])* $field:ident: $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty),*
        }
        impl $crate::engine::params::KernelParams for $name {
            const WGSL: (&'static str, &'static str) = ($shader, $wgsl);
            fn fields() -> Vec<$crate::engine::params::Field> {
                vec![$((stringify!($field), std::mem::offset_of!($name, $field), std::mem::size_of::<$ty>())),*]
            }
        }
    };
}

/// One registered struct: (shader, WGSL struct, Rust type name, fields, size).
pub struct Layout {
    pub shader: &'static str,
    pub wgsl: &'static str,
    pub rust: &'static str,
    pub fields: Vec<Field>,
    pub size: usize,
}

fn layout<P: KernelParams>() -> Layout {
    layout_in::<P>(P::WGSL.0, P::WGSL.1)
}

/// `P` also describes a struct of another shader (the generated matmul files share theirs).
fn layout_in<P: KernelParams>(shader: &'static str, wgsl: &'static str) -> Layout {
    Layout { shader, wgsl, rust: std::any::type_name::<P>(), fields: P::fields(), size: std::mem::size_of::<P>() }
}

/// Every parameter struct the kernels use.
pub fn registry() -> Vec<Layout> {
    use super::kernels::*;
    use super::optim::OptimizerParams;
    vec![
        layout::<attention::AttentionParams>(),
        layout::<conv2d::ConvParams>(),
        layout::<copy::CopyParams>(),
        layout::<cross_entropy::CrossEntropyParams>(),
        layout::<elementwise::ElementwiseParams>(),
        layout::<embedding::EmbeddingParams>(),
        layout::<matmul::MatmulParams>(),
        layout_in::<matmul::MatmulParams>("matmul_subgroup", "Params"),
        layout_in::<matmul::MatmulParams>("matmul_f16", "Params"),
        layout::<matmul::PackParams>(),
        layout::<matmul::GemvParams>(),
        layout_in::<matmul::GemvParams>("matmul_subgroup", "GemvParams"),
        layout::<norm::NormParams>(),
        layout_in::<norm::NormParams>("norm_subgroup", "Params"),
        layout::<OptimizerParams>(),
        layout::<quantize::QuantizeParams>(),
        layout::<reduce::ReduceParams>(),
        layout_in::<reduce::ReduceParams>("reduce_subgroup", "Params"),
        layout::<resample::ResampleParams>(),
        layout::<softmax::SoftmaxParams>(),
        layout_in::<softmax::SoftmaxParams>("softmax_subgroup", "Params"),
        layout::<winograd::WinogradParams>(),
    ]
}
