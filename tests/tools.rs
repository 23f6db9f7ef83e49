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
