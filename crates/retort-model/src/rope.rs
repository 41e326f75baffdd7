//! Rotary position embedding in Hugging Face's half-split layout (`rotate_half`).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Precomputed `cos`/`sin` tables, `(max_positions, D/2)`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, max_positions: usize, theta: f64, device: &Device) -> Result<Rope> {
        // inv_freq[i] = theta^(-2i/D), computed in f64 then stored as f32 like transformers does.
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), device)?;
        let positions = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let angles = positions.matmul(&inv_freq)?; // (P, D/2)
        Ok(Rope {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// Rotate `x (B, H, T, D)` for absolute positions `pos0 .. pos0 + T`.
    /// `differentiable` selects the composition of ops that carries gradients over the fused kernel.
    pub fn apply(&self, x: &Tensor, pos0: usize, differentiable: bool) -> Result<Tensor> {
        let (_b, _h, t, _d) = x.dims4()?;
        let cos = self.cos.narrow(0, pos0, t)?; // (T, D/2)
        let sin = self.sin.narrow(0, pos0, t)?;
        Ok(if differentiable && x.device().is_cpu() {
            retort_kernels::rope(x, &cos, &sin)?
        } else if differentiable {
            candle_nn::rotary_emb::rope_slow(x, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)?
        })
    }
}

impl Rope {
    /// Rotate `x (B, H, S, D)`, already rotated for some positions, back by `by` positions at
    /// every index: the result is what [`Rope::apply`] gives at positions `by` lower. Rotations
    /// compose (`R(a)·R(b) = R(a + b)`), so this is `R(−by)`: the same `cos`, negated `sin`.
    /// Used to move a generation cache towards position 0 without recomputing it.
    pub fn rotate_back(&self, x: &Tensor, by: usize) -> Result<Tensor> {
        self.rotate(x, by, true)
    }

    /// The inverse of [`Rope::rotate_back`]: `R(+by)`, what [`Rope::apply`] gives at positions
    /// `by` higher. Used to place a prompt prefilled at position 0 further along a batch.
    pub fn rotate_forward(&self, x: &Tensor, by: usize) -> Result<Tensor> {
        self.rotate(x, by, false)
    }

    fn rotate(&self, x: &Tensor, by: usize, back: bool) -> Result<Tensor> {
        let (_b, _h, s, _d) = x.dims4()?;
        if by == 0 {
            return Ok(x.clone());
        }
        let half = self.cos.dim(1)?;
        let cos = self
            .cos
            .narrow(0, by, 1)?
            .broadcast_as((s, half))?
            .contiguous()?; // (S, D/2)
        let sin = self.sin.narrow(0, by, 1)?;
        let sin = if back { sin.neg()? } else { sin };
        let sin = sin.broadcast_as((s, half))?.contiguous()?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotating_back_equals_applying_at_lower_positions() {
        let dev = Device::Cpu;
        let rope = Rope::new(16, 512, 10000.0, &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 5, 16), &dev).unwrap();
        let (p, by) = (300, 170);
        let shifted = rope
            .rotate_back(&rope.apply(&x, p, false).unwrap(), by)
            .unwrap();
        let direct = rope.apply(&x, p - by, false).unwrap();
        let d = retort_test::max_abs_diff(&shifted, &direct);
        assert!(d < 1e-4, "max |Δ| = {d}");
        // Rotating back by 0 is the identity.
        let same = rope.rotate_back(&x, 0).unwrap();
        assert!(retort_test::max_abs_diff(&same, &x) < 1e-6);
        // Forward is the inverse, and equals applying at higher positions.
        let there = rope
            .rotate_forward(&rope.apply(&x, p - by, false).unwrap(), by)
            .unwrap();
        let d = retort_test::max_abs_diff(&there, &rope.apply(&x, p, false).unwrap());
        assert!(d < 1e-4, "forward: max |Δ| = {d}");
        let round = rope
            .rotate_back(&rope.rotate_forward(&x, by).unwrap(), by)
            .unwrap();
        assert!(retort_test::max_abs_diff(&round, &x) < 1e-5);
    }

    #[test]
    fn fused_and_differentiable_agree_at_an_offset() {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 64, 10_000.0, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let a = rope.apply(&x, 7, false).unwrap();
        let b = rope.apply(&x, 7, true).unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn rotation_preserves_pair_norm_and_position_zero_is_identity() {
        let dev = Device::Cpu;
        let rope = Rope::new(4, 16, 10_000.0, &dev).unwrap();
        let x = Tensor::new(&[[[[1f32, 2., 3., 4.]]]], &dev).unwrap();
        let at0 = rope.apply(&x, 0, true).unwrap();
        assert_eq!(
            at0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 2., 3., 4.]
        );
        // Half-split pairs are (x[i], x[i + D/2]); their norm is preserved at any position.
        let r = rope
            .apply(&x, 5, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(((r[0] * r[0] + r[2] * r[2]) - 10.0).abs() < 1e-4);
        assert!(((r[1] * r[1] + r[3] * r[3]) - 20.0).abs() < 1e-4);
    }
}
