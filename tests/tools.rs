//! tools/convert_taming.py against the fixtures' expected model files.

mod common;

#[test]
fn converter_reproduces_the_fixture_model_files() {
    let Some(dir) = common::fixtures_dir() else { return };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/test_convert.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&dir)
        .output()
        .expect("python3 is needed for the converter test (tools/setup.sh installs what it needs)");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "converter test failed:\n{text}");
    assert!(text.contains("PASS vqgan") && text.contains("PASS transformer"));
}
