//! What the engine does with each key of the reference's config blocks, so
//! that a key it does not implement is an error naming it, never ignored:
//! a key is used, inert (paths, data keys, logging: no effect on the
//! numbers), or accepted only at the value that leaves the model as the
//! engine computes it ("off").

use anyhow::{bail, Result};
use serde_json::Value;

pub enum Key {
    /// Read by the engine.
    Used(&'static str),
    /// No effect on what the engine computes.
    Inert(&'static str),
    /// Accepted only where `is_off` holds; otherwise `what` is not implemented.
    OnlyOff(&'static str, fn(&Value) -> bool, &'static str),
}

pub fn is_null(v: &Value) -> bool {
    v.is_null()
}
pub fn is_false(v: &Value) -> bool {
    v.is_null() || v == &Value::Bool(false)
}
pub fn is_true(v: &Value) -> bool {
    v.is_null() || v == &Value::Bool(true)
}
pub fn is_zero(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(0.0)
}
pub fn is_minus_one(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(-1.0)
}

/// Check every key of the object `v` (the block at `path`, e.g.
/// `params.ddconfig`) against `keys`.
pub fn check(path: &str, v: &Value, keys: &[Key]) -> Result<()> {
    let Some(obj) = v.as_object() else { return Ok(()) };
    for (k, val) in obj {
        let known = keys.iter().find(|key| match key {
            Key::Used(n) | Key::Inert(n) | Key::OnlyOff(n, _, _) => n == k,
        });
        match known {
            None => {
                let names: Vec<&str> = keys
                    .iter()
                    .map(|key| match key {
                        Key::Used(n) | Key::Inert(n) | Key::OnlyOff(n, _, _) => *n,
                    })
                    .collect();
                bail!("config: {path}.{k} is not implemented by this engine (known keys: {})", names.join(", "))
            }
            Some(Key::OnlyOff(_, is_off, what)) if !is_off(val) => {
                bail!("config: {path}.{k} = {val}: {what} is not implemented by this engine")
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_and_switched_on_keys_are_errors_naming_them() {
        let keys = [Key::Used("ch"), Key::Inert("ckpt_path"), Key::OnlyOff("remap", is_null, "index remapping")];
        assert!(check("params", &json!({"ch": 1, "ckpt_path": "x", "remap": null}), &keys).is_ok());
        let e = check("params", &json!({"ch": 1, "tanh_out": true}), &keys).unwrap_err().to_string();
        assert!(e.contains("params.tanh_out") && e.contains("known keys: ch, ckpt_path, remap"), "{e}");
        let e = check("params", &json!({"remap": "a.npy"}), &keys).unwrap_err().to_string();
        assert!(e.contains("params.remap") && e.contains("index remapping"), "{e}");
    }
}
