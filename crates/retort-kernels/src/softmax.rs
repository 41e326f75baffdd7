//! Attention's scaled, causally masked softmax as one op with its backward: the scores
//! `x (B, KVH, G·T, S)` (queries of the G heads that share a key/value head stacked along the
//! position axis, as `model::Attention` lays them out) become `P = softmax(scale·x + mask)`.
//! It replaces a scale, a broadcast mask add and candle's differentiable softmax (five ops, each
//! a `(B, H, T, S)` tensor, and as many in backward).
//!
//! Mask: the query at row `t` of a head sits at absolute position `pos0 + t`; it sees key `j`
//! when `j ≤ pos0 + t` and, for a left-padded sequence `b`, `j ≥ left_pad[b]` (a padding query
//! sees only itself) — the same rule as `model::attention_mask`.
//!
//! Backward: `∂x_j = scale · P_j · (g_j − Σ_k g_k P_k)`, from the saved output.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::rms_norm::{slice, values};
use super::{exp, par};

/// `softmax(scale · x + causal/left-pad mask)` over the last dim of `x (B, KVH, G·T, S)`, for
/// queries at positions `pos0 .. pos0 + t`.
pub fn masked_softmax(
    x: &Tensor,
    scale: f32,
    t: usize,
    pos0: usize,
    left_pad: &[usize],
) -> candle_core::Result<Tensor> {
    let (b, _kvh, gt, s) = x.dims4()?;
    if t == 0 || gt % t != 0 || pos0 + t > s {
        candle_core::bail!("masked_softmax: {gt} query rows, T = {t}, pos0 = {pos0}, S = {s}");
    }
    if !left_pad.is_empty() && left_pad.len() != b {
        candle_core::bail!("masked_softmax: {} left pads for batch {b}", left_pad.len());
    }
    x.contiguous()?.apply_op1(MaskedSoftmax {
        scale,
        t,
        pos0,
        left_pad: Arc::new(left_pad.to_vec()),
    })
}

#[derive(Clone)]
struct MaskedSoftmax {
    scale: f32,
    t: usize,
    pos0: usize,
    left_pad: Arc<Vec<usize>>,
}

impl MaskedSoftmax {
    /// Visible keys of row `r` as a range, plus the single key a padding query sees.
    fn visible(&self, r: usize, rows_per_batch: usize) -> std::ops::Range<usize> {
        let q = self.pos0 + r % self.t;
        let pad = self.left_pad.get(r / rows_per_batch).copied().unwrap_or(0);
        if q < pad { q..q + 1 } else { pad..q + 1 }
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "retort-masked-softmax"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(st, l, "masked_softmax")?;
        let dims = l.dims();
        let s = dims[3];
        let rows_per_batch = dims[1] * dims[2];
        let mut p = vec![0f32; x.len()];
        par::rows(&mut p, s, |r, pr| {
            let xr = &x[r * s..(r + 1) * s];
            let vis = self.visible(r, rows_per_batch);
            let k = self.scale;
            // scale > 0, so max(x·k) = max(x)·k.
            let max = exp::max(&xr[vis.clone()]) * k;
            exp::exp_scaled(&xr[vis.clone()], k, max, &mut pr[vis.clone()]);
            let inv = 1.0 / pr[vis.clone()].iter().sum::<f32>();
            for v in &mut pr[vis] {
                *v *= inv;
            }
        });
        Ok((CpuStorage::F32(p), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, kvh, gt, s) = x.dims4()?;
        let rows_per_batch = kvh * gt;
        let (p, gv) = (values(res)?, values(g)?);
        let mut dx = vec![0f32; p.len()];
        par::rows(&mut dx, s, |r, dr| {
            let vis = self.visible(r, rows_per_batch);
            let (pr, gr) = (&p[r * s..(r + 1) * s], &gv[r * s..(r + 1) * s]);
            let dot: f32 = vis.clone().map(|j| pr[j] * gr[j]).sum();
            for j in vis {
                dr[j] = self.scale * pr[j] * (gr[j] - dot);
            }
        });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// The additive attention mask `(B|1, 1, T, S)` with `S = pos0 + T`, or `None` when nothing
/// needs masking (one new position and no padding).
///
/// Query `i` (absolute position `pos0 + i`) may see key `j` iff `j ≤ pos0 + i` and `j` is not
/// padding. A padding query sees only itself, so its row stays finite (its output is never used).
pub fn attention_mask(
    b: usize,
    t: usize,
    pos0: usize,
    left_pad: &[usize],
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    let s = pos0 + t;
    let padded = left_pad.iter().any(|&p| p > 0);
    if t == 1 && !padded {
        return Ok(None);
    }
    let rows = if padded { b } else { 1 };
    let mut m = vec![0f32; rows * t * s];
    for r in 0..rows {
        let pad = if padded { left_pad[r] } else { 0 };
        for i in 0..t {
            let qpos = pos0 + i;
            for j in 0..s {
                let visible = j <= qpos && (j >= pad || j == qpos);
                if !visible {
                    m[(r * t + i) * s + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (rows, 1, t, s), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_against_composition;
    use candle_core::Device;

    /// The composition `model::Attention` used: scale, add the mask per group, softmax.
    fn composed(x: &Tensor, scale: f64, t: usize, pos0: usize, pad: &[usize]) -> Tensor {
        let (b, kvh, gt, s) = x.dims4().unwrap();
        let g = gt / t;
        let att = (x * scale).unwrap();
        let att = match attention_mask(b, t, pos0, pad, x.device()).unwrap() {
            Some(m) => att
                .reshape((b, kvh, g, t, s))
                .unwrap()
                .broadcast_add(&m.unsqueeze(1).unwrap())
                .unwrap()
                .reshape((b, kvh, gt, s))
                .unwrap(),
            None => att,
        };
        candle_nn::ops::softmax(&att, candle_core::D::Minus1).unwrap()
    }

    #[test]
    fn values_and_gradients_match_the_masked_composition() {
        let dev = Device::Cpu;
        // Training shape (pos0 = 0), left padding (generation's prefill), and a cached offset.
        for (b, kvh, g, t, pos0, pad) in [
            (2, 3, 3, 20, 0, vec![]),
            (3, 1, 2, 9, 0, vec![0, 4, 8]),
            (2, 2, 2, 5, 7, vec![2, 0]),
        ] {
            let s = pos0 + t;
            let x = Tensor::randn(0f32, 3.0, (b, kvh, g * t, s), &dev).unwrap();
            let scale = 0.125f32;
            check_against_composition(
                &[x],
                |v| masked_softmax(&v[0], scale, t, pos0, &pad),
                |v| Ok(composed(&v[0], scale as f64, t, pos0, &pad)),
                1e-5,
            );
        }
    }
}
