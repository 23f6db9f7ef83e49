//! Every config of the reference's `configs/` (tests/data/reference_configs,
//! copied from CompVis/taming-transformers with its license) as the engine
//! reads it: the models it runs load their config, and the others are refused
//! with an error naming what is missing. No device needed.

use taming::models::cond_transformer::Net2NetConfig;
use taming::models::vqgan::VqganConfig;
use taming::workflows::run::read_config_file;

/// Ok, or the error text.
fn read(name: &str) -> Result<(), String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference_configs").join(name);
    let file = read_config_file(&path).map_err(|e| format!("{e:#}"))?;
    let model = &file["model"];
    match model["target"].as_str().unwrap_or("") {
        t if taming::models::vqgan::is_target(t) => VqganConfig::from_config(model).map(|_| ()),
        "taming.models.cond_transformer.Net2NetTransformer" => {
            // The reference's configs leave the first stage's checkpoint to ckpt_path.
            Net2NetConfig::from_config(model).map(|_| ())
        }
        other => Err(anyhow::anyhow!("model target {other} is not supported")),
    }
    .map_err(|e| format!("{e:#}"))
}

#[test]
fn reference_configs_load_or_are_refused_by_name() {
    let supported = [
        "imagenet_vqgan.yaml",
        "custom_vqgan.yaml",
        "faceshq_vqgan.yaml",
        "imagenetdepth_vqgan.yaml",
        "coco_cond_stage.yaml",
        "sflckr_cond_stage.yaml",
        "faceshq_transformer.yaml",
        "drin_transformer.yaml",
    ];
    for name in supported {
        read(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // What each of the others needs, named in its error.
    let refused: [(&str, &str); 2] = [
        ("coco_scene_images_transformer.yaml", "DummyCondStage"),
        ("open_images_scene_images_transformer.yaml", "DummyCondStage"),
    ];
    for (name, named) in refused {
        let e = read(name).err().unwrap_or_else(|| panic!("{name} was accepted"));
        assert!(e.contains(named), "{name}: {e}");
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference_configs");
    let yamls =
        std::fs::read_dir(dir).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "yaml"));
    assert_eq!(yamls.count(), supported.len() + refused.len(), "a config without an expectation");
}
