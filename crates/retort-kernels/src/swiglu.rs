//! SwiGLU's gate: `y = silu(a) ⊙ b = a·σ(a) ⊙ b` in one op with its backward
//! (`∂b = g ⊙ silu(a)`, `∂a = g ⊙ b ⊙ σ(a)·(1 + a·(1 − σ(a)))`), instead of candle's `silu` and
//! a multiply, which keep two `(rows, F)` intermediates for backward.
//!
//! Shapes: `a`, `b`, `y` all `(…, F)`; f32, CPU.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::rms_norm::{slice, values};
use super::{exp, par};

/// `silu(gate) ⊙ up`, with gradients to both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

const ROW: usize = 4096;

/// `out[i] = exp(−x[i])`, vectorised (`exp`); σ(x) = 1 / (1 + out). libm's scalar `expf` here
/// was 1.9 % of a training step's samples (AMX host, online teacher, bf16).
fn exp_neg(x: &[f32], out: &mut [f32]) {
    exp::exp_scaled(x, -1.0, 0.0, out);
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "retort-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = slice(s1, l1, "swiglu")?;
        let b = slice(s2, l2, "swiglu")?;
        if l1.dims() != l2.dims() {
            candle_core::bail!("swiglu: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let mut y = vec![0f32; a.len()];
        par::rows(&mut y, ROW, |r, yr| {
            let o = r * ROW;
            let (ar, br) = (&a[o..o + yr.len()], &b[o..o + yr.len()]);
            exp_neg(ar, yr);
            for ((yi, &x), &u) in yr.iter_mut().zip(ar).zip(br) {
                *yi = x * u / (1.0 + *yi);
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (av, bv, gv) = (values(a)?, values(b)?, values(g)?);
        // One buffer holds ∂a then ∂b per chunk, so both come out of one parallel pass.
        let mut both = vec![0f32; 2 * av.len()];
        let n = av.len();
        let (da, db) = both.split_at_mut(n);
        std::thread::scope(|s| {
            let threads = candle_core::utils::get_num_threads().max(1);
            let per = n.div_ceil(threads).max(1);
            for ((c, da), db) in da.chunks_mut(per).enumerate().zip(db.chunks_mut(per)) {
                let (av, bv, gv) = (&av, &bv, &gv);
                s.spawn(move || {
                    let o = c * per;
                    let len = da.len();
                    let (ar, br, gr) = (&av[o..o + len], &bv[o..o + len], &gv[o..o + len]);
                    exp_neg(ar, da);
                    for i in 0..len {
                        let (x, u, gi) = (ar[i], br[i], gr[i]);
                        let sg = 1.0 / (1.0 + da[i]);
                        db[i] = gi * x * sg;
                        da[i] = gi * u * sg * (1.0 + x * (1.0 - sg));
                    }
                });
            }
        });
        let db = both.split_off(n);
        Ok((
            Some(Tensor::from_vec(both, a.shape(), a.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::check_against_composition;
    use candle_core::Device;

    #[test]
    fn values_and_gradients_match_silu_times_up() {
        let dev = Device::Cpu;
        // 2·50·123 = 12,300 values: several rows of the split, one partial.
        let a = Tensor::randn(0f32, 3.0, (2, 50, 123), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (2, 50, 123), &dev).unwrap();
        check_against_composition(
            &[a, b],
            |v| swiglu(&v[0], &v[1]),
            |v| v[0].silu()? * &v[1],
            1e-5,
        );
    }
}
