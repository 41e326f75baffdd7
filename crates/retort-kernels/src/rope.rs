//! Rotary position embedding (Hugging Face's half-split `rotate_half` layout) as one op with its
//! backward, the inverse rotation: for `i < D/2`, with angle θ at position `pos0 + t`,
//! `y_i = x_i cos θ − x_{i+D/2} sin θ`, `y_{i+D/2} = x_{i+D/2} cos θ + x_i sin θ`, and
//! `∂x_i = g_i cos θ + g_{i+D/2} sin θ`, `∂x_{i+D/2} = g_{i+D/2} cos θ − g_i sin θ`.
//! candle's fused `rope` has no backward and `rope_slow` allocates six tensors.
//!
//! Shapes: `x (B, H, T, D)`; `cos`, `sin` `(T, D/2)` for the positions of this call; f32, CPU.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::par;
use super::rms_norm::{slice, values};

/// Rotate `x (B, H, T, D)` by the angles whose cosines and sines are `cos`, `sin` `(T, D/2)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    let (cos, sin) = (values(cos)?, values(sin)?);
    if cos.len() != t * d / 2 || sin.len() != t * d / 2 || d % 2 != 0 {
        candle_core::bail!(
            "rope: tables must be (T, D/2) = ({t}, {}) for even D",
            d / 2
        );
    }
    x.contiguous()?.apply_op1(Rope {
        t,
        d,
        cos: Arc::new(cos),
        sin: Arc::new(sin),
        inverse: false,
    })
}

#[derive(Clone)]
struct Rope {
    t: usize,
    d: usize,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    /// Rotate by −θ (the backward).
    inverse: bool,
}

impl Rope {
    fn run(&self, x: &[f32]) -> Vec<f32> {
        let (t, d, h) = (self.t, self.d, self.d / 2);
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        par::rows(&mut y, d, |r, yr| {
            let xr = &x[r * d..(r + 1) * d];
            let pos = r % t;
            let (c, s) = (
                &self.cos[pos * h..(pos + 1) * h],
                &self.sin[pos * h..(pos + 1) * h],
            );
            for i in 0..h {
                let (a, b) = (xr[i], xr[i + h]);
                let si = sign * s[i];
                yr[i] = a * c[i] - b * si;
                yr[i + h] = b * c[i] + a * si;
            }
        });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "retort-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "rope")?;
        Ok((CpuStorage::F32(self.run(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inv = Rope {
            inverse: !self.inverse,
            ..self.clone()
        };
        let dx = inv.run(&values(g)?);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_against_composition;
    use candle_core::Device;

    #[test]
    fn values_and_gradients_match_rope_slow() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 40, 64);
        let angles = Tensor::randn(0f32, 2.0, (t, d / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let x = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
        check_against_composition(
            &[x],
            |v| rope(&v[0], &cos, &sin),
            |v| candle_nn::rotary_emb::rope_slow(&v[0], &cos, &sin),
            1e-5,
        );
    }
}
