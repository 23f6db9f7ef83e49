//! The order in which a Net2NetTransformer reads and writes an image's codes
//! (`taming/modules/transformer/permuter.py`): the codes of an h x w grid, in
//! raster order, are shuffled before the transformer sees them (training)
//! and unshuffled after it samples them (before decoding). The reference
//! builds each order with numpy; these are the same constructions, checked
//! against orders dumped from the reference (`tools/dump_permuters.py`).

use anyhow::{bail, Result};
use serde_json::Value;

pub const PREFIX: &str = "taming.modules.transformer.permuter.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Identity,
    Subsample,
    ZCurve,
    SpiralOut,
    SpiralIn,
    Random,
    AlternateParsing,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Identity,
        Kind::Subsample,
        Kind::ZCurve,
        Kind::SpiralOut,
        Kind::SpiralIn,
        Kind::Random,
        Kind::AlternateParsing,
    ];

    /// The reference's class name (`taming.modules.transformer.permuter.<name>`).
    pub fn name(self) -> String {
        format!("{self:?}")
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A permuter of an h x w grid: `forward[k]` is the raster index of the k-th
/// code the transformer sees; `backward` its inverse.
#[derive(Clone, Debug, PartialEq)]
pub struct Permuter {
    pub kind: Kind,
    pub h: usize,
    pub w: usize,
    pub forward: Vec<usize>,
    pub backward: Vec<usize>,
}

impl Permuter {
    /// The identity on an h x w grid.
    pub fn identity(h: usize, w: usize) -> Permuter {
        Permuter { kind: Kind::Identity, h, w, forward: (0..h * w).collect(), backward: (0..h * w).collect() }
    }

    /// From a `permuter_config` (absent or null: the identity), for a grid of h x w codes.
    pub fn from_config(config: Option<&Value>, h: usize, w: usize) -> Result<Permuter> {
        let Some(c) = config.filter(|c| !c.is_null()) else { return Ok(Permuter::identity(h, w)) };
        let target = c.get("target").and_then(|t| t.as_str()).unwrap_or("");
        let Some(kind) = target.strip_prefix(PREFIX).and_then(Kind::from_name) else {
            bail!("config: permuter_config target '{target}' is not one of the reference's permuters ({PREFIX}*)")
        };
        if kind != Kind::Identity {
            let dim = |k: &str| c.pointer(&format!("/params/{k}")).and_then(|v| v.as_u64()).map(|v| v as usize);
            match (dim("H"), dim("W")) {
                (Some(ph), Some(pw)) if (ph, pw) == (h, w) => {}
                (ph, pw) => bail!("config: permuter_config.params H, W = {ph:?}, {pw:?}; the code grid is {h}x{w}"),
            }
        }
        Permuter::new(kind, h, w)
    }

    pub fn new(kind: Kind, h: usize, w: usize) -> Result<Permuter> {
        let forward = match kind {
            Kind::Identity => (0..h * w).collect(),
            Kind::Subsample => subsample(h, w)?,
            Kind::ZCurve => zcurve(h, w)?,
            Kind::SpiralOut => spiral(h, w)?,
            Kind::SpiralIn => spiral(h, w)?.into_iter().rev().collect(),
            Kind::Random => numpy_permutation(1, h * w),
            Kind::AlternateParsing => {
                (0..h).flat_map(|i| (0..w).map(move |j| i * w + if i % 2 == 1 { w - 1 - j } else { j })).collect()
            }
        };
        let mut backward = vec![0; forward.len()];
        for (k, &i) in forward.iter().enumerate() {
            backward[i] = k;
        }
        Ok(Permuter { kind, h, w, forward, backward })
    }

    pub fn is_identity(&self) -> bool {
        self.forward.iter().enumerate().all(|(k, &i)| k == i)
    }

    /// Raster-order codes in the transformer's order (`permuter(x)`). The
    /// identity takes grids of any size (the sliding window samples larger ones).
    pub fn apply(&self, raster: &[u32]) -> Result<Vec<u32>> {
        self.reorder(raster, &self.forward)
    }

    /// The transformer's order back to raster order (`permuter(x, reverse=True)`).
    pub fn undo(&self, permuted: &[u32]) -> Result<Vec<u32>> {
        self.reorder(permuted, &self.backward)
    }

    fn reorder(&self, codes: &[u32], order: &[usize]) -> Result<Vec<u32>> {
        if self.kind == Kind::Identity {
            return Ok(codes.to_vec());
        }
        if codes.len() != order.len() {
            bail!("the {:?} permuter orders {}x{} codes, not {}", self.kind, self.h, self.w, codes.len());
        }
        Ok(order.iter().map(|&i| codes[i]).collect())
    }

    /// The reference's `permuter_config` for this order (None for the identity).
    pub fn to_config(&self) -> Option<Value> {
        (self.kind != Kind::Identity).then(|| {
            serde_json::json!({"target": format!("{PREFIX}{}", self.kind.name()), "params": {"H": self.h, "W": self.w}})
        })
    }
}

/// `Subsample`: repeatedly split into 2x2 blocks, the block offsets becoming channels.
fn subsample(h: usize, w: usize) -> Result<Vec<usize>> {
    // indices[c][y][x] as a flat vector with shape (c, hh, ww).
    let (mut c, mut hh, mut ww) = (1usize, h, w);
    let mut idx: Vec<usize> = (0..h * w).collect();
    while hh.min(ww) > 1 {
        if hh % 2 != 0 || ww % 2 != 0 {
            bail!("the Subsample permuter needs a grid whose sides halve down to 1, not {h}x{w}");
        }
        // reshape (c, hh/2, 2, ww/2, 2) -> transpose (0, 2, 4, 1, 3) -> (c*4, hh/2, ww/2)
        let (h2, w2) = (hh / 2, ww / 2);
        let mut next = vec![0; idx.len()];
        for ci in 0..c {
            for a in 0..h2 {
                for p in 0..2 {
                    for b in 0..w2 {
                        for q in 0..2 {
                            let src = ((ci * hh) + (a * 2 + p)) * ww + (b * 2 + q);
                            let dst = (((ci * 2 + p) * 2 + q) * h2 + a) * w2 + b;
                            next[dst] = idx[src];
                        }
                    }
                }
            }
        }
        idx = next;
        (c, hh, ww) = (c * 4, h2, w2);
    }
    if hh != 1 || ww != 1 {
        bail!("the Subsample permuter needs a square grid of a power of two, not {h}x{w}");
    }
    Ok(idx)
}

/// `ZCurve`: raster indices sorted by their Morton code (bits of j at even positions, of i at odd ones).
fn zcurve(h: usize, w: usize) -> Result<Vec<usize>> {
    let morton =
        |i: u64, j: u64| (0..32).fold(0u64, |z, pos| z | ((j & (1 << pos)) << pos) | ((i & (1 << pos)) << (pos + 1)));
    let codes: Vec<u64> = (0..h).flat_map(|i| (0..w).map(move |j| morton(i as u64, j as u64))).collect();
    // The reference's backward order is the Morton codes themselves: only a permutation on power-of-two squares.
    if h != w || !h.is_power_of_two() {
        bail!("the ZCurve permuter needs a square grid of a power of two, not {h}x{w}");
    }
    let mut order: Vec<usize> = (0..h * w).collect();
    order.sort_by_key(|&k| codes[k]);
    Ok(order)
}

/// `SpiralOut`: from the centre, left, down, right, up in growing arms.
fn spiral(h: usize, w: usize) -> Result<Vec<usize>> {
    if h != w || h < 2 || !h.is_multiple_of(2) {
        bail!("the spiral permuters need an even square grid, not {h}x{w}");
    }
    let size = w as i64;
    let at = |i: i64, j: i64| (i * size + j) as usize;
    let (mut i, mut j) = (size / 2, size / 2 - 1);
    let mut idx = vec![at(i, j)];
    let mut step = 0;
    for c in 1..=size / 2 {
        step += 1;
        for _ in 0..step {
            i -= 1;
            idx.push(at(i, j));
        }
        for _ in 0..step {
            j += 1;
            idx.push(at(i, j));
        }
        step += 1;
        if c < size / 2 {
            for _ in 0..step {
                i += 1;
                idx.push(at(i, j));
            }
            for _ in 0..step {
                j -= 1;
                idx.push(at(i, j));
            }
        } else {
            for _ in 0..step - 1 {
                i += 1;
                idx.push(at(i, j));
            }
        }
    }
    Ok(idx)
}

/// `np.random.RandomState(seed).permutation(n)`: MT19937 seeded by
/// `init_genrand`, then numpy's legacy Fisher-Yates shuffle drawing
/// `random_interval(i)` by masked rejection.
fn numpy_permutation(seed: u32, n: usize) -> Vec<usize> {
    let mut mt = Mt19937::new(seed);
    let mut out: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let max = i as u64;
        let mask = {
            let mut m = max;
            m |= m >> 1;
            m |= m >> 2;
            m |= m >> 4;
            m |= m >> 8;
            m |= m >> 16;
            m |= m >> 32;
            m
        };
        let j = loop {
            let v = if max <= 0xffff_ffff {
                mt.next_u32() as u64 & mask
            } else {
                ((mt.next_u32() as u64) << 32 | mt.next_u32() as u64) & mask
            };
            if v <= max {
                break v as usize;
            }
        };
        out.swap(i, j);
    }
    out
}

/// The Mersenne Twister numpy's legacy `RandomState` uses.
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            state[i] = 1812433253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.state[i] = v;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_order_is_a_permutation_and_undoes() {
        for kind in Kind::ALL {
            let p = Permuter::new(kind, 8, 8).unwrap();
            let mut sorted = p.forward.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..64).collect::<Vec<_>>(), "{kind:?}");
            let x: Vec<u32> = (0..64).map(|i| i * 3 + 1).collect();
            assert_eq!(p.undo(&p.apply(&x).unwrap()).unwrap(), x, "{kind:?}");
            assert!(kind == Kind::Identity || p.apply(&x[..63]).is_err());
        }
        // Small cases worked by hand from the reference's constructions.
        assert_eq!(Permuter::new(Kind::AlternateParsing, 2, 3).unwrap().forward, [0, 1, 2, 5, 4, 3]);
        assert_eq!(Permuter::new(Kind::Subsample, 2, 2).unwrap().forward, [0, 1, 2, 3]);
        assert_eq!(Permuter::new(Kind::Subsample, 4, 4).unwrap().forward[..4], [0, 2, 8, 10]);
        assert_eq!(Permuter::new(Kind::ZCurve, 2, 2).unwrap().forward, [0, 1, 2, 3]);
        assert_eq!(Permuter::new(Kind::ZCurve, 4, 4).unwrap().forward[..8], [0, 1, 4, 5, 2, 3, 6, 7]);
        assert_eq!(Permuter::new(Kind::SpiralOut, 2, 2).unwrap().forward, [2, 0, 1, 3]);
        assert!(Permuter::new(Kind::ZCurve, 6, 6).is_err());
        // MT19937 seeded with 5489 (its reference seed): the first output is 3499211612.
        assert_eq!(Mt19937::new(5489).next_u32(), 3499211612);
    }
}
