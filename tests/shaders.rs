//! Every WGSL file parses and validates with naga, also after specialisation.

use taming::engine::shaders::{specialize, EXTENDS, SHADERS};

fn validate(name: &str, src: &str) {
    let module = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));
}

#[test]
fn every_shader_file_is_listed_and_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    files.sort();
    for f in &files {
        let name = f.trim_end_matches(".wgsl");
        let listed = SHADERS.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{f} is not in SHADERS"));
        let mut on_disk = std::fs::read_to_string(dir.join(f)).unwrap();
        // A module that extends another is that file with its own appended.
        if let Some((_, base)) = EXTENDS.iter().find(|(n, _)| *n == name) {
            on_disk = std::fs::read_to_string(dir.join(format!("{base}.wgsl"))).unwrap() + &on_disk;
        }
        assert_eq!(listed.1, on_disk, "{f}: embedded source differs from the file");
        validate(name, &on_disk);
    }
    assert_eq!(files.len(), SHADERS.len());
}

#[test]
fn specialisation_replaces_constants_and_rejects_unknown_ones() {
    let src = SHADERS.iter().find(|(n, _)| *n == "attention").unwrap().1;
    let s = specialize(src, &[("MAX_D4", "16u".into())]).unwrap();
    assert!(s.contains("const MAX_D4: u32 = 16u;"));
    validate("attention (MAX_D4=16)", &s);
    assert!(specialize(src, &[("NOPE", "1u".into())]).is_err());
}

/// Every kernel parameter struct the launchers fill (`engine::params`)
/// has the WGSL struct's fields: same names, in the same order, at the same
/// offsets and sizes, and the same total size.
#[test]
fn kernel_parameter_structs_match_their_wgsl_structs() {
    let registry = taming::engine::params::registry();
    assert!(registry.len() >= 18, "only {} parameter structs registered", registry.len());
    for l in &registry {
        let src =
            taming::engine::shaders::source(l.shader).unwrap_or_else(|| panic!("{}: no shader {}", l.rust, l.shader));
        let module = naga::front::wgsl::parse_str(src).unwrap();
        let (members, span) = module
            .types
            .iter()
            .find_map(|(_, t)| match (&t.name, &t.inner) {
                (Some(n), naga::TypeInner::Struct { members, span }) if n == l.wgsl => Some((members.clone(), *span)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{}: no struct {} in shaders/{}.wgsl", l.rust, l.wgsl, l.shader));
        let wgsl: Vec<(String, usize, usize)> = members
            .iter()
            .map(|m| {
                (
                    m.name.clone().unwrap_or_default(),
                    m.offset as usize,
                    module.types[m.ty].inner.size(module.to_ctx()) as usize,
                )
            })
            .collect();
        let rust: Vec<(String, usize, usize)> = l.fields.iter().map(|(n, o, s)| (n.to_string(), *o, *s)).collect();
        assert_eq!(rust, wgsl, "{} vs {}::{} (name, offset, size)", l.rust, l.shader, l.wgsl);
        assert_eq!(l.size, span as usize, "{}: size", l.rust);
    }
    // Every WGSL struct bound as uniform parameters is registered.
    for (name, src) in taming::engine::shaders::SHADERS {
        let module = naga::front::wgsl::parse_str(src).unwrap();
        for (_, var) in module.global_variables.iter() {
            if var.space != naga::AddressSpace::Uniform {
                continue;
            }
            let ty = module.types[var.ty].name.clone().unwrap_or_default();
            assert!(
                registry.iter().any(|l| l.shader == *name && l.wgsl == ty),
                "shaders/{name}.wgsl's {ty} has no Rust struct"
            );
        }
    }
}

/// The generated files are what tools/gen_matmul_wgsl.py writes now: it
/// regenerates them into a temporary folder and they must be identical.
#[test]
fn generated_shaders_and_tile_list_match_their_generator() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("taming-gen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = match std::process::Command::new(&python).arg(root.join("tools/gen_matmul_wgsl.py")).arg(&out).status()
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("\n*** SKIPPED: {python} not found ({e}); the generated files were not compared ***\n");
            return;
        }
    };
    assert!(status.success(), "tools/gen_matmul_wgsl.py failed");
    for f in ["shaders/matmul.wgsl", "shaders/matmul_subgroup.wgsl", "src/engine/tiles.rs"] {
        let fresh = std::fs::read_to_string(out.join(f)).unwrap();
        let checked_in = std::fs::read_to_string(root.join(f)).unwrap();
        assert!(
            fresh == checked_in,
            "{f} differs from what tools/gen_matmul_wgsl.py writes: run it and commit the result"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}
