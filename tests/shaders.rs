//! Every WGSL file parses and validates with naga, also after specialisation.

use taming::engine::shaders::{specialize, SHADERS};

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
        let on_disk = std::fs::read_to_string(dir.join(f)).unwrap();
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
