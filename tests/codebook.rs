//! Our codebook options (not the reference's; off by default): the l2-normalised lookup, the
//! low-dimensional lookup with its projections, and dead-code restarts, each against a host
//! computation of what it should do.

mod common;
use common::gpu;

use serde_json::json;
use taming::engine::kernels::random_vec;
use taming::engine::{Tape, Tensor};
use taming::models::vqgan::{l2_normalize_rows, Vqgan, VqganConfig};
use taming::workflows::train_vqgan::DeadCodes;

fn host_normalize(x: &[f64], k: usize) -> Vec<f64> {
    x.chunks(k)
        .flat_map(|r| {
            let n = (r.iter().map(|v| v * v).sum::<f64>() + 1e-24).sqrt();
            r.iter().map(move |v| v / n)
        })
        .collect()
}

/// Rows of 7 values (not a multiple of a vec4): forward against the host, and the gradient of
/// sum(w * normalize(x)) against central differences of the host forward.
#[test]
fn l2_normalised_rows_match_the_host_and_finite_differences() {
    let (n, k) = (5, 7);
    let x = random_vec(n * k, 3, 1.0);
    let w = random_vec(n * k, 4, 1.0);
    let tape = Tape::new();
    let xv = tape.leaf(Tensor::from_f32(&gpu(), &x, &[n, k]).unwrap());
    let y = l2_normalize_rows(&tape, &xv).unwrap();
    let wv = tape.constant(Tensor::from_f32(&gpu(), &w, &[n, k]).unwrap());
    let loss = tape.reduce(&tape.mul(&y, &wv).unwrap(), taming::engine::kernels::reduce::Reduce::Sum).unwrap();
    let got = y.value.to_vec().unwrap();
    let want = host_normalize(&x.iter().map(|&v| v as f64).collect::<Vec<_>>(), k);
    for (g, e) in got.iter().zip(&want) {
        assert!((*g as f64 - e).abs() < 1e-6, "normalised {g} vs {e}");
    }
    for r in got.chunks(k) {
        let norm: f32 = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "row norm {norm}");
    }
    let grad = tape.grad(&loss, &[&xv]).unwrap()[0].clone().unwrap().to_vec().unwrap();
    let f = |xs: &[f64]| -> f64 { host_normalize(xs, k).iter().zip(&w).map(|(a, &b)| a * b as f64).sum() };
    let base: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for i in 0..n * k {
        let h = 1e-5;
        let (mut up, mut down) = (base.clone(), base.clone());
        up[i] += h;
        down[i] -= h;
        let fd = (f(&up) - f(&down)) / (2.0 * h);
        assert!((grad[i] as f64 - fd).abs() < 1e-3 * (1.0 + fd.abs()), "d/dx[{i}]: {} vs {fd}", grad[i]);
    }
}

fn small_config(l2: bool, lookup: Option<usize>) -> VqganConfig {
    let mut params = json!({
        "embed_dim": 6, "n_embed": 24,
        "ddconfig": {"double_z": false, "z_channels": 8, "resolution": 8, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "codebook_l2_norm": l2,
    });
    if let Some(k) = lookup {
        params["codebook_embed_dim"] = json!(k);
    }
    VqganConfig::from_config(&json!({"target": "taming.models.vqgan.VQModel", "params": params})).unwrap()
}

/// The options' lookup on the host: z (quant_conv's output) as rows, through proj_in,
/// normalised; the most similar normalised codebook row; z_q = proj_out(that row).
#[test]
fn the_lookup_with_options_matches_a_host_reference() {
    for (l2, lookup) in [(true, Some(3)), (true, None), (false, Some(3))] {
        let cfg = small_config(l2, lookup);
        let vq = Vqgan::random(&gpu(), cfg.clone(), 9).unwrap();
        let names: Vec<&String> = vq.params.order.iter().filter(|n| n.starts_with("quantize.")).collect();
        assert_eq!(names.len(), if lookup.is_some() { 5 } else { 1 }, "{names:?}");
        let x = random_vec(2 * 3 * 8 * 8, 5, 1.0);
        let tape = Tape::inference();
        let p = vq.params.constants(&tape);
        let out = vq.forward(&tape, &p, &tape.constant(Tensor::from_f32(&gpu(), &x, &[2, 3, 8, 8]).unwrap())).unwrap();
        let host = |name: &str| vq.params.get(name).unwrap().to_vec().unwrap();
        let (e, k, n_embed, hw) = (6, lookup.unwrap_or(6), 24, 16);
        let z = out.quant_conv_out.value.to_vec().unwrap();
        let mut rows: Vec<f64> = Vec::new();
        for b in 0..2 {
            for pos in 0..hw {
                let r: Vec<f64> = (0..e).map(|c| z[(b * e + c) * hw + pos] as f64).collect();
                match lookup {
                    Some(_) => {
                        let (w, bias) = (host("quantize.proj_in.weight"), host("quantize.proj_in.bias"));
                        rows.extend(
                            (0..k).map(|o| bias[o] as f64 + (0..e).map(|i| w[o * e + i] as f64 * r[i]).sum::<f64>()),
                        );
                    }
                    None => rows.extend(r),
                }
            }
        }
        let cb: Vec<f64> = host("quantize.embedding.weight").iter().map(|&v| v as f64).collect();
        let (rows, cb) = if l2 { (host_normalize(&rows, k), host_normalize(&cb, k)) } else { (rows, cb) };
        let codes_read = out.indices.read().unwrap();
        let mut mismatched = 0;
        for (i, r) in rows.chunks(k).enumerate() {
            let dist = |c: usize| (0..k).map(|d| (r[d] - cb[c * k + d]).powi(2)).sum::<f64>();
            let best = (0..n_embed).min_by(|&a, &b| dist(a).total_cmp(&dist(b))).unwrap();
            let got = codes_read[i] as usize;
            // A near-tie may go either way in f32.
            if got != best && (dist(got) - dist(best)).abs() > 1e-5 {
                mismatched += 1;
            }
        }
        assert_eq!(mismatched, 0, "codes differ from the host's nearest (l2 {l2}, lookup {lookup:?})");
        // z_q: the chosen rows (projected back), laid out [B, E, h, w].
        let zq = out.z_q.value.to_vec().unwrap();
        for b in 0..2 {
            for pos in 0..hw {
                let c = codes_read[b * hw + pos] as usize;
                let row = &cb[c * k..(c + 1) * k];
                let want: Vec<f64> = match lookup {
                    Some(_) => {
                        let (w, bias) = (host("quantize.proj_out.weight"), host("quantize.proj_out.bias"));
                        (0..e)
                            .map(|o| bias[o] as f64 + (0..k).map(|i| w[o * k + i] as f64 * row[i]).sum::<f64>())
                            .collect()
                    }
                    None => row.to_vec(),
                };
                for ch in 0..e {
                    let g = zq[(b * e + ch) * hw + pos] as f64;
                    assert!((g - want[ch]).abs() < 1e-4, "z_q[{b},{ch},{pos}] {g} vs {}", want[ch]);
                }
            }
        }
        // encode -> decode by codes gives the forward's codes and output.
        let xin = tape.constant(Tensor::from_f32(&gpu(), &x, &[2, 3, 8, 8]).unwrap());
        let (codes, h, w) = vq.encode_indices(&tape, &p, &xin).unwrap();
        assert_eq!(codes.concat(), codes_read);
        let dec = vq.decode_indices(&tape, &p, &codes, h, w).unwrap().value.to_vec().unwrap();
        let fwd = out.decoder_out.value.to_vec().unwrap();
        let worst = dec.iter().zip(&fwd).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "decode of the codes differs from the forward by {worst}");
    }
}

#[test]
fn codebook_options_are_checked() {
    let bad = |params: serde_json::Value| {
        VqganConfig::from_config(&json!({"target": "taming.models.vqgan.GumbelVQ", "params": params}))
            .unwrap_err()
            .to_string()
    };
    let dd = json!({"double_z": false, "z_channels": 8, "resolution": 8, "in_channels": 3, "out_ch": 3, "ch": 32,
                    "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0});
    let e = bad(json!({"embed_dim": 8, "n_embed": 4, "ddconfig": dd, "codebook_l2_norm": true}));
    assert!(e.contains("GumbelVQ"), "{e}");
    let e = VqganConfig::from_config(&json!({"target": "taming.models.vqgan.VQModel",
        "params": {"embed_dim": 8, "n_embed": 4, "ddconfig": dd, "codebook_l2_norm": "yes"}}))
    .unwrap_err()
    .to_string();
    assert!(e.contains("codebook_l2_norm"), "{e}");
}

/// A code no batch chose for `after` steps takes one of the batch's lookup vectors as its
/// row; codes in use keep theirs.
#[test]
fn dead_codes_restart_from_the_batch() {
    let cb0: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let codebook = Tensor::from_f32(&gpu(), &cb0, &[5, 2]).unwrap();
    let mut dead = DeadCodes::new(5, 2, 0, 1);
    let rows = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6];
    let all = || Ok(rows.to_vec());
    // Step 1: nothing is unused for 2 steps yet (and the rows are not read).
    let unread = || -> anyhow::Result<Vec<f32>> { panic!("rows read with no code due") };
    assert_eq!(dead.update(&codebook, &[0, 0, 1], unread, 1).unwrap(), 0);
    assert_eq!(codebook.to_vec().unwrap(), cb0);
    // Step 2: codes 2, 3 and 4 were last used at the start (step 0); 1 at step 1.
    assert_eq!(dead.update(&codebook, &[0, 0, 0], all, 2).unwrap(), 3);
    let cb = codebook.to_vec().unwrap();
    assert_eq!(&cb[..4], &cb0[..4], "codes in use keep their rows");
    for c in 2..5 {
        let row = &cb[c * 2..c * 2 + 2];
        assert!(rows.chunks(2).any(|r| r == row), "code {c} restarted to {row:?}, not a batch vector");
    }
    // Restarted codes get a fresh `after` steps.
    assert_eq!(dead.update(&codebook, &[0, 1, 1], all, 3).unwrap(), 0);
    assert!(dead.update(&codebook, &[0], || Ok(rows[..2].to_vec()), 3).is_ok());
    // Step 4: codes 2..4 are due again; rows that do not match the codes are an error.
    assert!(dead.update(&codebook, &[0, 1], || Ok(rows[..2].to_vec()), 4).is_err(), "rows must match the codes");
}

/// The entropy loss's value on the host (f64): mean row entropy of p = softmax(-|z - e|^2 / T)
/// minus the entropy of the mean p, with the same +1e-5 inside the logarithms.
fn host_entropy(z: &[f64], cb: &[f64], k: usize, temperature: f64) -> f64 {
    let (n, m) = (z.len() / k, cb.len() / k);
    let mut mean = vec![0.0; m];
    let mut sample = 0.0;
    for r in z.chunks(k) {
        let a: Vec<f64> =
            cb.chunks(k).map(|e| -(0..k).map(|d| (r[d] - e[d]).powi(2)).sum::<f64>() / temperature).collect();
        let mx = a.iter().cloned().fold(f64::MIN, f64::max);
        let s: f64 = a.iter().map(|x| (x - mx).exp()).sum();
        for (j, x) in a.iter().enumerate() {
            let p = (x - mx).exp() / s;
            sample -= p * (p + 1e-5).ln();
            mean[j] += p / n as f64;
        }
    }
    sample / n as f64 + mean.iter().map(|p| p * (p + 1e-5).ln()).sum::<f64>()
}

#[test]
fn entropy_loss_matches_the_host_and_finite_differences() {
    use taming::models::vqgan::codebook_entropy_loss;
    let (n, m, k, temp) = (6, 5, 3, 0.5);
    let z = random_vec(n * k, 21, 1.0);
    let cb = random_vec(m * k, 22, 1.0);
    let tape = Tape::new();
    let zv = tape.leaf(Tensor::from_f32(&gpu(), &z, &[n, k]).unwrap());
    let cv = tape.leaf(Tensor::from_f32(&gpu(), &cb, &[m, k]).unwrap());
    let loss = codebook_entropy_loss(&tape, &zv, &cv, temp as f32).unwrap();
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let (z64, cb64) = (f64s(&z), f64s(&cb));
    let want = host_entropy(&z64, &cb64, k, temp);
    let got = loss.value.to_scalar().unwrap() as f64;
    assert!((got - want).abs() < 1e-4, "entropy loss {got} vs host {want}");
    let grads = tape.grad(&loss, &[&zv, &cv]).unwrap();
    for (which, base, grad) in [(0, &z64, &grads[0]), (1, &cb64, &grads[1])] {
        let grad = grad.as_ref().unwrap().to_vec().unwrap();
        for i in 0..base.len() {
            let h = 1e-5;
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                if which == 0 {
                    host_entropy(&v, &cb64, k, temp)
                } else {
                    host_entropy(&z64, &v, k, temp)
                }
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!((grad[i] as f64 - fd).abs() < 2e-3 * (1.0 + fd.abs()), "input {which}[{i}]: {} vs {fd}", grad[i]);
        }
    }
}
