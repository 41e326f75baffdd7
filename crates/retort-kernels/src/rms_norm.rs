//! RMSNorm with its backward in one op: `y = x · r · w`, `r = (mean(x²) + ε)^-½` over the last
//! dim. The composition it replaces (`sqr`, `mean`, `+ε`, `sqrt`, `recip`, two broadcast
//! multiplies) allocates seven `(rows, C)` tensors forward and more backward.
//!
//! Backward, with `g = ∂L/∂y` and `u = g ⊙ w`:
//! `∂L/∂x = r·u − x · r³ · (u·x) / C`, `∂L/∂w = Σ_rows g ⊙ x · r`.
//!
//! Shapes: `x (…, C)`, `w (C)`, `y (…, C)`; f32, CPU.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::par;

/// `x (…, C) · rsqrt(mean(x²) + eps) · w (C)` with gradients to `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f32,
}

/// The contiguous f32 data of a storage, or an error naming the op.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: inputs must be f32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: inputs must be contiguous");
    };
    Ok(&v[a..b])
}

/// The contiguous f32 data of a tensor (copied out of the tensor's storage).
pub(crate) fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "retort-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "rms_norm")?;
        let w = slice(s2, l2, "rms_norm")?;
        let c = w.len();
        if l1.dims().last() != Some(&c) {
            candle_core::bail!("rms_norm: x {:?} does not end in C = {c}", l1.dims());
        }
        let mut y = vec![0f32; x.len()];
        par::rows(&mut y, c, |r, yr| {
            let xr = &x[r * c..(r + 1) * c];
            let inv = inv_rms(xr, self.eps);
            for ((yi, xi), wi) in yr.iter_mut().zip(xr).zip(w) {
                *yi = xi * inv * wi;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (xs, ws, gs) = (values(x)?, values(w)?, values(g)?);
        let c = ws.len();
        let mut dx = vec![0f32; xs.len()];
        let dw = par::rows2_acc(&mut dx, c, c, |r, dxr, dw| {
            let xr = &xs[r * c..(r + 1) * c];
            let gr = &gs[r * c..(r + 1) * c];
            let inv = inv_rms(xr, self.eps);
            let ux: f32 = gr
                .iter()
                .zip(&ws)
                .zip(xr)
                .map(|((g, w), x)| g * w * x)
                .sum();
            let k = inv * inv * inv * ux / c as f32;
            for i in 0..c {
                dxr[i] = inv * gr[i] * ws[i] - xr[i] * k;
                dw[i] += gr[i] * xr[i] * inv;
            }
        });
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_against_composition};
    use candle_core::{D, Device, Tensor};

    fn composed(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?
            .broadcast_mul(w)
    }

    #[test]
    fn values_and_gradients_match_the_composition() {
        let dev = Device::Cpu;
        // 300 rows × 70 so that the rows split across threads.
        let x = Tensor::randn(0f32, 2.0, (3, 100, 70), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.3, 70, &dev).unwrap();
        check_against_composition(
            &[x, w],
            |v| rms_norm(&v[0], &v[1], 1e-5),
            |v| composed(&v[0], &v[1], 1e-5),
            1e-5,
        );
    }

    #[test]
    fn a_row_of_equal_values_normalises_to_the_weight() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3f32, 3., 3., 3.]], &dev).unwrap();
        let w = Tensor::new(&[1f32, 2., 0.5, -1.], &dev).unwrap();
        let y = rms_norm(&x, &w, 0.0).unwrap();
        assert_close(
            &y,
            &Tensor::new(&[[1f32, 2., 0.5, -1.]], &dev).unwrap(),
            1e-6,
        );
    }
}
