//! The WGSL sources, embedded in the binary, and their specialisation.

use anyhow::{bail, Result};

/// Every kernel family: (name, WGSL source). One file per family in `shaders/`.
pub const SHADERS: &[(&str, &str)] = &[
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("matmul_subgroup", include_str!("../../shaders/matmul_subgroup.wgsl")),
    ("matmul_f16", include_str!("../../shaders/matmul_f16.wgsl")),
    ("conv2d", include_str!("../../shaders/conv2d.wgsl")),
    ("winograd", include_str!("../../shaders/winograd.wgsl")),
    ("norm", include_str!("../../shaders/norm.wgsl")),
    (
        "norm_subgroup",
        concat!(include_str!("../../shaders/norm.wgsl"), include_str!("../../shaders/norm_subgroup.wgsl")),
    ),
    ("softmax", include_str!("../../shaders/softmax.wgsl")),
    ("softmax_subgroup", include_str!("../../shaders/softmax_subgroup.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
    ("quantize", include_str!("../../shaders/quantize.wgsl")),
    ("elementwise", include_str!("../../shaders/elementwise.wgsl")),
    ("resample", include_str!("../../shaders/resample.wgsl")),
    ("reduce", include_str!("../../shaders/reduce.wgsl")),
    (
        "reduce_subgroup",
        concat!(include_str!("../../shaders/reduce.wgsl"), include_str!("../../shaders/reduce_subgroup.wgsl")),
    ),
    ("embedding", include_str!("../../shaders/embedding.wgsl")),
    ("cross_entropy", include_str!("../../shaders/cross_entropy.wgsl")),
    ("copy", include_str!("../../shaders/copy.wgsl")),
    ("optimizer", include_str!("../../shaders/optimizer.wgsl")),
];

/// Modules made of another family's file with their own file appended: (module, base). Their
/// entries share the base's parameters, bindings and helpers but need a device feature the base
/// does not (subgroups), so they are a module of their own.
pub const EXTENDS: &[(&str, &str)] = &[("norm_subgroup", "norm"), ("reduce_subgroup", "reduce")];

/// A hash (FNV-1a) of every kernel's name and source: the caches of verdicts and tuning key on
/// it, so a build whose kernels changed is checked and tuned again even at the same version.
pub fn sources_hash() -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for (name, src) in SHADERS {
        for b in name.bytes().chain(src.bytes()) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

pub fn source(name: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// Replace the value of top-level `const NAME: type = value;` declarations.
/// Used for tile sizes and workgroup shapes, which WGSL `override`s cannot
/// size private arrays with. Every file stays valid WGSL with its defaults.
pub fn specialize(src: &str, consts: &[(&str, String)]) -> Result<String> {
    let mut out = String::with_capacity(src.len());
    let mut used = vec![false; consts.len()];
    for line in src.lines() {
        let mut replaced = false;
        if let Some(rest) = line.strip_prefix("const ") {
            for (i, (name, value)) in consts.iter().enumerate() {
                if let Some(after) = rest.strip_prefix(name) {
                    if let Some(ty_start) = after.strip_prefix(':') {
                        let ty = ty_start.split('=').next().unwrap_or("").trim();
                        out.push_str(&format!("const {name}: {ty} = {value};\n"));
                        used[i] = true;
                        replaced = true;
                        break;
                    }
                }
            }
        }
        if !replaced {
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some(i) = used.iter().position(|u| !u) {
        bail!("shader specialisation: no `const {}` to replace", consts[i].0);
    }
    Ok(out)
}
