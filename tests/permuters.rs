//! The permuters against the orders the reference builds
//! (tests/data/permuters.json, written by tools/dump_permuters.py from the
//! reference's permuter.py with numpy and torch): every kind and size, both
//! directions; no device needed.

use taming::models::permuter::{Kind, Permuter};

#[test]
fn permuters_match_the_reference_orders() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/permuters.json");
    let orders: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for o in orders.as_array().unwrap() {
        let kind = Kind::from_name(o["kind"].as_str().unwrap()).expect("a reference permuter");
        let (h, w) = (o["H"].as_u64().unwrap() as usize, o["W"].as_u64().unwrap() as usize);
        let list =
            |k: &str| -> Vec<usize> { o[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect() };
        let p = Permuter::new(kind, h, w).unwrap_or_else(|e| panic!("{kind:?} {h}x{w}: {e}"));
        assert_eq!(p.forward, list("forward"), "{kind:?} {h}x{w} forward");
        assert_eq!(p.backward, list("backward"), "{kind:?} {h}x{w} backward");
        // From a config, as a model file names it.
        let config = serde_json::json!({"target": format!("taming.modules.transformer.permuter.{}", kind.name()), "params": {"H": h, "W": w}});
        assert_eq!(Permuter::from_config(Some(&config), h, w).unwrap(), p);
        checked += 1;
    }
    assert_eq!(checked, 26);
    // A config for another grid, or an unknown permuter, is an error naming it.
    let config =
        serde_json::json!({"target": "taming.modules.transformer.permuter.Subsample", "params": {"H": 8, "W": 8}});
    assert!(format!("{}", Permuter::from_config(Some(&config), 16, 16).unwrap_err()).contains("16x16"));
    let config = serde_json::json!({"target": "taming.modules.transformer.permuter.Hilbert"});
    assert!(format!("{}", Permuter::from_config(Some(&config), 16, 16).unwrap_err()).contains("Hilbert"));
}
