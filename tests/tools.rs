//! tools/convert_taming.py and tools/convert_lpips.py against the fixtures'
//! expected model files, and the LPIPS file loaded by the engine.

mod common;

#[test]
fn converters_reproduce_the_fixture_model_files() {
    let Some(dir) = common::fixtures_dir() else { return };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/test_convert.py");
    let lpips = std::env::temp_dir().join(format!("taming-lpips-{}.safetensors", std::process::id()));
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&dir)
        .arg(&lpips)
        .output()
        .expect("python3 is needed for the converter test (tools/setup.sh installs what it needs)");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "converter test failed:\n{text}");
    assert!(text.contains("PASS vqgan") && text.contains("PASS transformer") && text.contains("PASS lpips"));

    // train-vqgan --lpips reads the converted file: the same weights as the checkpoint's loss.perceptual_loss.*.
    let gpu = common::gpu();
    let converted = taming::workflows::train_vqgan::load_lpips(&gpu, &lpips).unwrap().expect("LPIPS weights in the converted file");
    let from_model = taming::workflows::train_vqgan::load_lpips(&gpu, &dir.join("vqgan/model.safetensors")).unwrap().unwrap();
    assert_eq!(converted.params.order.len(), 33);
    for n in &converted.params.order {
        assert_eq!(converted.params.get(n).unwrap().to_vec().unwrap(), from_model.params.get(n).unwrap().to_vec().unwrap(), "{n}");
    }
    std::fs::remove_file(&lpips).ok();
}
