//! Attention for decoding, one new position per row, as one op: scores, masked softmax and the
//! weighted sum of values together, reading the key/value cache in place.
//!
//! The composed path runs two batched GEMMs with `G` query rows each (`(B, KVH, G, D)` against
//! `(B, KVH, S, D)`), one per `(row, kv head)` — hundreds of tiny products per layer — and
//! reads every cached position of every row, including the left padding a row cannot see. Here
//! each `(row, kv head)` reads its visible keys and values once, for all `G` query heads that
//! share them, and skips the padding: with continuous batching (`crate::batching`) a row that
//! joined late has a long masked prefix.
//!
//! Inputs: `q (B, KVH, G, D)`, keys and values `(B, KVH, S, D)` (any strides with the last dim
//! contiguous, e.g. a view of the cache); the query sits at position `S − 1` and sees keys
//! `left_pad[b] ..= S − 1`. Output `(B, KVH, G, D)`. Inference only: no backward.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::{exp, par};

/// `softmax(scale · q·Kᵀ + mask) · V` for one query position per row (see the module docs).
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    left_pad: &[usize],
) -> candle_core::Result<Tensor> {
    let (b, kvh, _g, d) = q.dims4()?;
    let (kb, kh, s, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, kvh, d) || v.dims() != k.dims() || s == 0 {
        candle_core::bail!(
            "decode_attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if !left_pad.is_empty() && left_pad.len() != b {
        candle_core::bail!(
            "decode_attention: {} left pads for batch {b}",
            left_pad.len()
        );
    }
    q.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &DecodeAttention {
            scale,
            left_pad: Arc::new(left_pad.to_vec()),
        },
    )
}

struct DecodeAttention {
    scale: f32,
    left_pad: Arc<Vec<usize>>,
}

/// A strided `(B, KVH, S, D)` f32 view with a contiguous last dim.
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    stride: [usize; 3],
}

impl<'a> View<'a> {
    fn new(st: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Self> {
        let CpuStorage::F32(data) = st else {
            candle_core::bail!("decode_attention: {what} must be f32");
        };
        let s = l.stride();
        if s.len() != 4 || s[3] != 1 {
            candle_core::bail!("decode_attention: {what} needs a contiguous last dim");
        }
        Ok(View {
            data,
            offset: l.start_offset(),
            stride: [s[0], s[1], s[2]],
        })
    }

    #[inline]
    fn row(&self, b: usize, h: usize, j: usize, d: usize) -> &'a [f32] {
        let at = self.offset + b * self.stride[0] + h * self.stride[1] + j * self.stride[2];
        &self.data[at..at + d]
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight lanes of partial sums, so the compiler vectorises the reduction.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "retort-decode-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = super::rms_norm::slice(qs, ql, "decode_attention")?;
        let (k, v) = (View::new(ks, kl, "keys")?, View::new(vs, vl, "values")?);
        let dims = ql.dims();
        let (kvh, g, d) = (dims[1], dims[2], dims[3]);
        let s = kl.dims()[2];
        let mut out = vec![0f32; q.len()];
        // One (row, kv head) per task: its G queries read each visible key and value once.
        par::rows(&mut out, g * d, |r, o| {
            let (b, h) = (r / kvh, r % kvh);
            let from = self.left_pad.get(b).copied().unwrap_or(0).min(s - 1);
            let n = s - from;
            let qr = &q[r * g * d..(r + 1) * g * d];
            let mut scores = vec![0f32; g * n]; // (G, n)
            for j in 0..n {
                let kj = k.row(b, h, from + j, d);
                for gi in 0..g {
                    scores[gi * n + j] = dot(&qr[gi * d..(gi + 1) * d], kj);
                }
            }
            let mut p = vec![0f32; n];
            for gi in 0..g {
                let sr = &scores[gi * n..(gi + 1) * n];
                let max = exp::max(sr) * self.scale; // scale > 0
                exp::exp_scaled(sr, self.scale, max, &mut p);
                let inv = 1.0 / p.iter().sum::<f32>();
                for x in &mut p {
                    *x *= inv;
                }
                scores[gi * n..(gi + 1) * n].copy_from_slice(&p);
            }
            for j in 0..n {
                let vj = v.row(b, h, from + j, d);
                for gi in 0..g {
                    let w = scores[gi * n + j];
                    for (oi, vi) in o[gi * d..(gi + 1) * d].iter_mut().zip(vj) {
                        *oi += w * vi;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close;
    use candle_core::Device;

    /// The composed path of `model::Attention`: two products around the masked softmax.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, pad: &[usize]) -> Tensor {
        let s = k.dim(2).unwrap();
        let scores = q.matmul(&k.t().unwrap()).unwrap();
        let p = crate::masked_softmax(&scores, scale, 1, s - 1, pad).unwrap();
        p.matmul(&v.contiguous().unwrap()).unwrap()
    }

    #[test]
    fn equals_the_composition_on_strided_cache_views_with_padding() {
        let dev = Device::Cpu;
        // (B, KVH, G, D, S cached of a buffer of S_max, left pads)
        for (b, kvh, g, d, s, s_max, pad) in [
            (1, 1, 1, 8, 1, 4, vec![]),
            (2, 3, 3, 64, 37, 50, vec![]),
            (3, 2, 2, 20, 12, 12, vec![0, 5, 11]),
            (4, 3, 3, 64, 200, 260, vec![150, 0, 199, 7]),
        ] {
            let q = Tensor::randn(0f32, 1., (b, kvh, g, d), &dev).unwrap();
            // A cache buffer with room for s_max positions, of which s are in use.
            let kb = Tensor::randn(0f32, 1., (b, kvh, s_max, d), &dev).unwrap();
            let vb = Tensor::randn(0f32, 1., (b, kvh, s_max, d), &dev).unwrap();
            let (k, v) = (kb.narrow(2, 0, s).unwrap(), vb.narrow(2, 0, s).unwrap());
            let scale = 1.0 / (d as f32).sqrt();
            let fused = decode_attention(&q, &k, &v, scale, &pad).unwrap();
            assert_close(&fused, &composed(&q, &k, &v, scale, &pad), 1e-5);
        }
    }
}
