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
    let converted =
        taming::workflows::train_vqgan::load_lpips(&gpu, &lpips).unwrap().expect("LPIPS weights in the converted file");
    let from_model =
        taming::workflows::train_vqgan::load_lpips(&gpu, &dir.join("vqgan/model.safetensors")).unwrap().unwrap();
    assert_eq!(converted.params.order.len(), 33);
    for n in &converted.params.order {
        assert_eq!(
            converted.params.get(n).unwrap().to_vec().unwrap(),
            from_model.params.get(n).unwrap().to_vec().unwrap(),
            "{n}"
        );
    }
    std::fs::remove_file(&lpips).ok();
}

/// A Python with torch, torchvision and einops (the reference's imports), if any.
fn torch_python() -> Option<String> {
    let candidates =
        std::env::var("TAMING_TORCH_PYTHON").into_iter().chain(["python3".into(), "/usr/bin/python3".into()]);
    candidates.into_iter().find(|py| {
        std::process::Command::new(py)
            .args(["-c", "import torch, torchvision, einops"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// tools/dump_reference.py run on the fixtures' checkpoints and inputs gives
/// the fixtures again (every name and shape; values to 1e-4 relative), and
/// `taming verify` passes on its output. Needs torch and a checkout of the
/// reference (TAMING_REFERENCE_CODE=path/to/taming-transformers); without
/// them the test says so and checks nothing.
#[test]
fn dump_reference_reproduces_the_fixtures() {
    let Some(dir) = common::fixtures_dir() else { return };
    let (Ok(code), Some(py)) = (std::env::var("TAMING_REFERENCE_CODE"), torch_python()) else {
        println!(
            "SKIPPED dump_reference test: needs TAMING_REFERENCE_CODE (a taming-transformers checkout) \
                  and a python3 with torch, torchvision and einops"
        );
        return;
    };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/dump_reference.py");
    for name in ["vqgan", "transformer"] {
        let fixture = dir.join(name);
        let out = std::env::temp_dir().join(format!("taming-dump-{name}-{}", std::process::id()));
        let run = std::process::Command::new(&py)
            .arg(&script)
            .args([
                "--ckpt",
                &fixture.join("model.ckpt").to_string_lossy(),
                "--config",
                &fixture.join("model.yaml").to_string_lossy(),
            ])
            .args(["--input-from", &fixture.join("reference.safetensors").to_string_lossy(), "--reference-code", &code])
            .args(["--out", &out.to_string_lossy()])
            .output()
            .unwrap();
        assert!(run.status.success(), "dump_reference failed on {name}: {}", String::from_utf8_lossy(&run.stderr));
        let read = |p: &std::path::Path| std::fs::read(p).unwrap();
        let (got_bytes, want_bytes) =
            (read(&out.join("reference.safetensors")), read(&fixture.join("reference.safetensors")));
        let got = safetensors::SafeTensors::deserialize(&got_bytes).unwrap();
        let want = safetensors::SafeTensors::deserialize(&want_bytes).unwrap();
        let mut names: Vec<String> = want.names().into_iter().map(String::from).collect();
        names.sort();
        let mut got_names: Vec<String> = got.names().into_iter().map(String::from).collect();
        got_names.sort();
        assert_eq!(got_names, names, "{name}: the dump has other tensors than the fixture");
        for n in &names {
            let (g, w) = (got.tensor(n).unwrap(), want.tensor(n).unwrap());
            assert_eq!((g.shape(), g.dtype()), (w.shape(), w.dtype()), "{name}: {n}");
            if w.dtype() == safetensors::Dtype::F32 {
                let (g, w): (Vec<f32>, Vec<f32>) =
                    (bytemuck::pod_collect_to_vec(g.data()), bytemuck::pod_collect_to_vec(w.data()));
                let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
                let err = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= 1e-4 * scale, "{name}: {n} differs by {err} (scale {scale})");
            } else {
                assert_eq!(g.data(), w.data(), "{name}: {n}");
            }
        }
        let tally = taming::workflows::verify::run_tally(&common::gpu(), std::slice::from_ref(&out)).unwrap();
        assert_eq!(tally.failed, 0, "{name}: verify failed on the dump");
        assert_eq!(tally.skipped, 0, "{name}: verify skipped tensors of the dump");
        std::fs::remove_dir_all(&out).ok();
    }
}

/// Every config of the reference's configs/ (tests/data/reference_configs), made small, built by
/// the reference with random weights, converted by tools/convert_taming.py, dumped by
/// tools/dump_reference.py and verified: 0 failed for each one the engine runs; the two
/// scene-image transformers convert, and loading them is refused naming DummyCondStage. Needs
/// torch and TAMING_REFERENCE_CODE, as the test above; without them it says so and checks nothing.
#[test]
fn every_reference_config_converts_and_verifies() {
    let (Ok(code), Some(py)) = (std::env::var("TAMING_REFERENCE_CODE"), torch_python()) else {
        println!("SKIPPED reference configs test: needs TAMING_REFERENCE_CODE and a python3 with torch");
        return;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let emoji = root.join("../shared/data/emoji/noto");
    let mut images = taming::workflows::data::list_images(&emoji).expect("../shared/data/emoji/noto");
    images.truncate(2);
    let out = std::env::temp_dir().join(format!("taming-refcfg-{}", std::process::id()));
    let run = std::process::Command::new(&py)
        .arg(root.join("tools/check_reference_configs.py"))
        .args(["--reference-code", &code, "--configs"])
        .arg(root.join("tests/data/reference_configs"))
        .arg("--images")
        .args(&images)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "check_reference_configs.py failed: {}", String::from_utf8_lossy(&run.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let summary = summary.as_object().unwrap();
    assert_eq!(summary.len(), 10, "{summary:?}");
    for (name, status) in summary {
        let dir = out.join(name.trim_end_matches(".yaml"));
        if status == "dumped" {
            let tally = taming::workflows::verify::run_tally(&common::gpu(), std::slice::from_ref(&dir)).unwrap();
            assert_eq!(tally.failed, 0, "{name}: verify failed");
            assert!(tally.passed >= 28, "{name}: only {} checks", tally.passed);
        } else {
            let file = taming::models::weights::ModelFile::open(&dir.join("model.safetensors")).unwrap();
            let e = taming::models::cond_transformer::Net2NetConfig::from_config(&file.config).unwrap_err();
            assert!(e.to_string().contains("DummyCondStage"), "{name}: {e}");
        }
    }
    std::fs::remove_dir_all(&out).ok();
}
