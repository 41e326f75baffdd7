//! `a (m, k) · b (k, n)` as a differentiable candle op whose products run in bf16 (f32 inputs,
//! f32 accumulation and output), PyTorch's bf16 autocast for a matmul. Backward is the same
//! kernel: `∂a = g · bᵀ`, `∂b = aᵀ · g`, read through strided views without copies.
//!
//! [`MatmulPrecision`] is the user-facing switch; `F32` keeps candle's f32 GEMM, and `Bf16` falls
//! back to it where the kernel cannot run (no AVX-512 BF16, a GPU device, decoding-size inputs).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use serde::{Deserialize, Serialize};

use super::amx_gemm;
use super::bf16_gemm::{self, MatRef};

/// Precision of the products inside the large matmuls (linear layers and the LM head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// f32 products (candle's GEMM): exact reference.
    #[default]
    F32,
    /// bf16 products, f32 accumulation (AVX-512 BF16); about 8 significant bits per product.
    Bf16,
}

impl MatmulPrecision {
    /// Whether bf16 products would actually run on this machine for a CPU tensor.
    pub fn bf16_runs_here(self) -> bool {
        self == MatmulPrecision::Bf16 && bf16_gemm::available()
    }
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!(
                "unknown matmul precision `{s}` (expected f32 or bf16)"
            )),
        }
    }
}

/// `a (m, k) · b (k, n) → (m, n)`, f32 CPU tensors of any strides, bf16 products; carries a
/// gradient to both operands. Needs [`bf16_gemm::available`].
pub fn matmul_bf16(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    a.apply_op2(b, Bf16MatMul)
}

struct Bf16MatMul;

fn view<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<(MatRef<'a>, usize, usize)> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("bf16 matmul: {what} must be f32");
    };
    let &[rows, cols] = l.dims() else {
        candle_core::bail!("bf16 matmul: {what} must be 2-D, got shape {:?}", l.dims());
    };
    let &[rs, cs] = l.stride() else {
        candle_core::bail!("bf16 matmul: {what} has strides {:?}", l.stride());
    };
    let offset = l.start_offset();
    if rows > 0 && cols > 0 && offset + (rows - 1) * rs + (cols - 1) * cs >= data.len() {
        candle_core::bail!("bf16 matmul: {what} layout runs past its storage");
    }
    Ok((
        MatRef {
            data,
            offset,
            rs,
            cs,
        },
        rows,
        cols,
    ))
}

impl CustomOp2 for Bf16MatMul {
    fn name(&self) -> &'static str {
        "retort-matmul-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if !bf16_gemm::available() {
            candle_core::bail!("bf16 matmul: this CPU has no AVX-512 BF16");
        }
        let (a, m, k) = view(s1, l1, "lhs")?;
        let (b, k2, n) = view(s2, l2, "rhs")?;
        if k != k2 {
            candle_core::bail!("bf16 matmul: shapes ({m}, {k}) · ({k2}, {n}) do not chain");
        }
        let threads = candle_core::utils::get_num_threads();
        let c = if amx_gemm::available() {
            let mut c = Vec::with_capacity(m * n);
            amx_gemm::gemm_uninit(m, n, k, a, b, &mut c.spare_capacity_mut()[..m * n], threads);
            // SAFETY: `gemm_uninit` wrote all m·n elements.
            #[allow(unsafe_code)]
            unsafe {
                c.set_len(m * n)
            };
            c
        } else {
            let mut c = vec![0f32; m * n];
            bf16_gemm::gemm(m, n, k, a, b, &mut c, threads);
            c
        };
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ga = matmul_bf16(g, &b.t()?)?; // (m, n)·(n, k)
        let gb = matmul_bf16(&a.t()?, g)?; // (k, m)·(m, n)
        Ok((Some(ga), Some(gb)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn ints(rows: usize, cols: usize, seed: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7 + seed * 3 + 1) % 9) as f32 - 4.0)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// On integer inputs (exact in bf16) values and both gradients equal candle's f32 matmul
    /// exactly, including through a transposed operand as a linear layer uses it.
    #[test]
    fn values_and_gradients_equal_the_f32_matmul_on_exact_inputs() {
        if !bf16_gemm::available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let x = Var::from_tensor(&ints(19, 70, 1)).unwrap(); // (rows, in)
        let w = Var::from_tensor(&ints(33, 70, 2)).unwrap(); // (out, in)
        let up = ints(19, 33, 3); // a fixed upstream gradient, via Σ y ⊙ up
        let ours = matmul_bf16(x.as_tensor(), &w.as_tensor().t().unwrap()).unwrap();
        let plain = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        assert_eq!(
            ours.to_vec2::<f32>().unwrap(),
            plain.to_vec2::<f32>().unwrap()
        );
        let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            let a = g1.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            let b = g2.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(a, b);
        }
    }

    /// On real-valued inputs the result stays within bf16 rounding of the f32 product.
    #[test]
    fn close_to_f32_on_real_values() {
        if !bf16_gemm::available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (64, 576), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (576, 100), &dev).unwrap();
        let ours = matmul_bf16(&a, &b).unwrap();
        let plain = a.matmul(&b).unwrap();
        let err = (ours - &plain).unwrap().abs().unwrap().max_all().unwrap();
        let err = err.to_scalar::<f32>().unwrap();
        // Each product carries ≤ 2·2^-9 relative error; 576 terms of magnitude ~1 with random
        // signs: the error is ~√576·2^-8 ≈ 0.1 at most in practice; the values are ~24.
        assert!(err < 0.5, "max abs error {err}");
        assert!(err > 0.0, "bf16 products should differ from f32 somewhere");
    }
}
