//! `a (m, k) · b (k, n)` as a differentiable candle op whose products run in bf16 (f32 inputs,
//! f32 accumulation and output), PyTorch's bf16 autocast for a matmul. Backward is the same
//! kernel: `∂a = g · bᵀ`, `∂b = aᵀ · g`, read through strided views without copies.
//!
//! [`MatmulPrecision`] is the user-facing switch; `F32` keeps candle's f32 GEMM, and `Bf16` falls
//! back to it where the kernel cannot run (no AVX-512 BF16, a GPU device, decoding-size inputs).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use serde::{Deserialize, Serialize};

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

    /// `f32` or `bf16`, as flags and recipes spell it.
    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        }
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

/// `a (…, m, k) · b (…, k, n) → (…, m, n)`, f32 CPU tensors, bf16 products; carries a gradient
/// to both operands. Leading (batch) dims must match and, within each operand, step by one
/// stride (any layout a transpose of the last two dims or a reshape of contiguous data has);
/// the last two dims may have any strides. Needs [`bf16_gemm::available`].
pub fn matmul_bf16(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    a.apply_op2(b, Bf16MatMul { scalar: false })
}

/// [`matmul_bf16`] on the portable scalar GEMM ([`bf16_gemm::gemm_scalar_uninit`]): the same op
/// (views, batches, backward) on any CPU, slowly; the reference its tests run everywhere.
pub fn matmul_bf16_scalar(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    a.apply_op2(b, Bf16MatMul { scalar: true })
}

struct Bf16MatMul {
    /// On [`bf16_gemm::gemm_scalar_uninit`] instead of this CPU's kernel.
    scalar: bool,
}

impl Bf16MatMul {
    fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: MatRef,
        b: MatRef,
        c: &mut [MaybeUninit<f32>],
        threads: usize,
    ) {
        if self.scalar {
            bf16_gemm::gemm_scalar_uninit(m, n, k, a, b, c);
        } else {
            bf16_gemm::gemm_uninit(m, n, k, a, b, c, threads);
        }
    }
}

/// An operand as `batch` matrices of `rows × cols`, the i-th starting `i · batch_stride` after
/// the first.
struct Operand<'a> {
    mat: MatRef<'a>,
    batch: usize,
    batch_stride: usize,
    rows: usize,
    cols: usize,
}

impl<'a> Operand<'a> {
    /// The i-th matrix of the batch.
    fn at(&self, i: usize) -> MatRef<'a> {
        MatRef {
            offset: self.mat.offset + i * self.batch_stride,
            ..self.mat
        }
    }
}

fn view<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Operand<'a>> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("bf16 matmul: {what} must be f32");
    };
    let (dims, strides) = (l.dims(), l.stride());
    let Some((&[rows, cols], lead)) = dims.split_last_chunk::<2>().map(|(l, r)| (r, l)) else {
        candle_core::bail!("bf16 matmul: {what} must be at least 2-D, got shape {dims:?}");
    };
    let nl = lead.len();
    let (rs, cs) = (strides[nl], strides[nl + 1]);
    // The batch dims must flatten to one stride: each (non-unit) dim steps by the next's
    // stride times its size.
    let batch: usize = lead.iter().product();
    let mut batch_stride = 0;
    let mut expect: Option<usize> = None;
    for i in (0..nl).rev() {
        if dims[i] == 1 {
            continue;
        }
        match expect {
            None => batch_stride = strides[i],
            Some(e) if e != strides[i] => candle_core::bail!(
                "bf16 matmul: {what}'s batch dims {lead:?} with strides {:?} do not flatten; \
                 make it contiguous first",
                &strides[..nl]
            ),
            Some(_) => {}
        }
        expect = Some(strides[i] * dims[i]);
    }
    let offset = l.start_offset();
    if batch > 0
        && rows > 0
        && cols > 0
        && offset + (batch - 1) * batch_stride + (rows - 1) * rs + (cols - 1) * cs >= data.len()
    {
        candle_core::bail!("bf16 matmul: {what} layout runs past its storage");
    }
    Ok(Operand {
        mat: MatRef {
            data,
            offset,
            rs,
            cs,
        },
        batch,
        batch_stride,
        rows,
        cols,
    })
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
        if !self.scalar && !bf16_gemm::available() {
            candle_core::bail!("bf16 matmul: this CPU has neither AVX-512 BF16 nor AMX");
        }
        let (a, b) = (view(s1, l1, "lhs")?, view(s2, l2, "rhs")?);
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let lead = &l1.dims()[..l1.dims().len() - 2];
        if k != b.rows || lead != &l2.dims()[..l2.dims().len() - 2] {
            candle_core::bail!(
                "bf16 matmul: shapes {:?} · {:?} do not chain",
                l1.dims(),
                l2.dims()
            );
        }
        let threads = candle_core::utils::get_num_threads();
        let len = a.batch * m * n;
        let mut c: Vec<f32> = Vec::with_capacity(len);
        let out = &mut c.spare_capacity_mut()[..len];
        if a.batch == 1 {
            self.gemm((m, n, k), a.mat, b.mat, out, threads);
        } else if m * n > 0 {
            // Batches (attention heads) split over the threads, one thread per product.
            let per = a.batch.div_ceil(threads.clamp(1, a.batch));
            rayon::scope(|s| {
                for (t, part) in out.chunks_mut(per * m * n).enumerate() {
                    let (a, b) = (&a, &b);
                    s.spawn(move |_| {
                        for (j, ci) in part.chunks_mut(m * n).enumerate() {
                            let i = t * per + j;
                            self.gemm((m, n, k), a.at(i), b.at(i), ci, 1);
                        }
                    });
                }
            });
        }
        // SAFETY: `gemm_uninit` wrote every one of the `len` values (each batch's m·n).
        #[allow(unsafe_code)]
        unsafe {
            c.set_len(len)
        };
        let mut shape = lead.to_vec();
        shape.extend([m, n]);
        Ok((CpuStorage::F32(c), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mm = |x: &Tensor, y: &Tensor| {
            x.apply_op2(
                y,
                Bf16MatMul {
                    scalar: self.scalar,
                },
            )
        };
        // An operand that is neither a variable nor computed from one (a LoRA student's frozen
        // base weight, the first layer's input) gets no gradient: a third of a linear layer's
        // training FLOPs and a weight-sized buffer saved.
        let ga = if a.track_op() {
            Some(mm(g, &b.t()?)?) // (m, n)·(n, k)
        } else {
            None
        };
        // A linear layer's `Wᵀ`: its gradient computed as (gᵀ·a)ᵀ arrives in the weight's own
        // layout, so the gradient store keeps it without a transposing copy (a weight-sized
        // copy per layer, and per logit chunk for the LM head). On AVX-512 BF16 (Zen 5, 0.5B
        // full fine-tune, train bench alternated): 64.2 → 68.7 and 87.2 → 105.9 tok/s. On the
        // AMX kernel it measured slower (447–467 → 387–394 tok/s, SmolLM2 student), so there the
        // product stays aᵀ·g.
        let gb = if !b.track_op() {
            None
        } else if weight_layout(b) && !crate::amx_gemm::available() {
            Some(mm(&g.t()?, a)?.t()?) // ((n, m)·(m, k))ᵀ
        } else {
            Some(mm(&a.t()?, g)?) // (k, m)·(m, n)
        };
        Ok((ga, gb))
    }
}

/// Whether `b` is a 2-D transposed view of a contiguous matrix (a linear layer's `Wᵀ`).
fn weight_layout(b: &Tensor) -> bool {
    let l = b.layout();
    match (l.dims(), l.stride()) {
        ([k, _], [1, rs]) => *rs == *k && *k > 1,
        _ => false,
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

    type MatMul = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;

    /// Each check on the portable scalar GEMM (any CPU), then on this CPU's bf16 kernel.
    const SCALAR: MatMul = matmul_bf16_scalar;

    fn native() -> MatMul {
        crate::testing::require(bf16_gemm::available(), "AVX-512 BF16 or AMX");
        matmul_bf16
    }

    #[test]
    fn scalar_equals_the_f32_matmul_on_exact_inputs() {
        values_and_gradients_equal_the_f32_matmul_on_exact_inputs(SCALAR);
        batched_equals_the_f32_matmul_on_exact_inputs(SCALAR);
        close_to_f32_on_real_values(SCALAR);
        a_frozen_operand_gets_no_gradient(SCALAR);
    }

    #[test]
    #[cfg_attr(
        not(any(retort_cpu_avx512bf16, retort_cpu_amx)),
        ignore = "this CPU has neither AVX-512 BF16 nor AMX"
    )]
    fn native_equals_the_f32_matmul_on_exact_inputs() {
        values_and_gradients_equal_the_f32_matmul_on_exact_inputs(native());
        batched_equals_the_f32_matmul_on_exact_inputs(native());
        close_to_f32_on_real_values(native());
        a_frozen_operand_gets_no_gradient(native());
    }

    /// On integer inputs (exact in bf16) values and both gradients equal candle's f32 matmul
    /// exactly, including through a transposed operand as a linear layer uses it.
    fn values_and_gradients_equal_the_f32_matmul_on_exact_inputs(matmul_bf16: MatMul) {
        let x = Var::from_tensor(&ints(19, 70, 1)).unwrap(); // (rows, in)
        let up = ints(19, 33, 3); // a fixed upstream gradient, via Σ y ⊙ up
        // b as a linear layer passes it (Wᵀ, a transposed view of W (out, in)), and plain.
        let w = Var::from_tensor(&ints(33, 70, 2)).unwrap();
        let b = Var::from_tensor(&ints(70, 33, 4)).unwrap();
        for (v, rhs) in [
            (&w, w.as_tensor().t().unwrap()),
            (&b, b.as_tensor().clone()),
        ] {
            let ours = matmul_bf16(x.as_tensor(), &rhs).unwrap();
            let plain = x.as_tensor().matmul(&rhs).unwrap();
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
            for var in [&x, v] {
                let a = g1.get(var.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
                let c = g2.get(var.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(a, c);
            }
        }
    }

    /// Batched (attention's shapes: (B, H, rows, k) · (B, H, S, k)ᵀ, then · (B, H, S, d)) on
    /// integer inputs: values and gradients equal candle's batched f32 matmul (the batches
    /// split over candle's threads).
    fn batched_equals_the_f32_matmul_on_exact_inputs(matmul_bf16: MatMul) {
        // Values in {-1, 0, 1}, so that the intermediate products (|scores| ≤ 40, their
        // gradients ≤ 17) are integers bf16 holds exactly when they feed the next product.
        let ints4 = |dims: (usize, usize, usize, usize), seed: usize| {
            let (a, b, c, d) = dims;
            let v: Vec<f32> = (0..a * b * c * d)
                .map(|i| ((i * 7 + seed * 3 + 1) % 3) as f32 - 1.0)
                .collect();
            Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
        };
        let q = Var::from_tensor(&ints4((2, 3, 19, 40), 1)).unwrap();
        let k = Var::from_tensor(&ints4((2, 3, 33, 40), 2)).unwrap();
        let v = Var::from_tensor(&ints4((2, 3, 33, 17), 3)).unwrap();
        let up = ints4((2, 3, 19, 17), 4); // |∂y| ≤ 1
        let run = |bf16: bool| {
            let mm = |a: &Tensor, b: &Tensor| {
                if bf16 {
                    matmul_bf16(a, b).unwrap()
                } else {
                    a.matmul(b).unwrap()
                }
            };
            let s = mm(q.as_tensor(), &k.as_tensor().t().unwrap());
            let y = mm(&s, v.as_tensor());
            let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Vec<f32>> = [&q, &k, &v]
                .iter()
                .map(|x| {
                    let gx = g.get(x.as_tensor()).unwrap();
                    gx.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
                .collect();
            (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), grads)
        };
        let (want, got) = (run(false), run(true));
        assert_eq!(got.0, want.0, "values");
        assert_eq!(got.1, want.1, "gradients of q, k, v");
    }

    /// A frozen weight (no Var behind it) gets no gradient, and the input's is unchanged.
    fn a_frozen_operand_gets_no_gradient(matmul_bf16: MatMul) {
        let x = Var::from_tensor(&ints(19, 70, 1)).unwrap();
        let up = ints(19, 33, 3);
        let w = Var::from_tensor(&ints(33, 70, 2)).unwrap();
        let frozen = w.as_tensor().detach();
        let grads = |wt: &Tensor| {
            let y = matmul_bf16(x.as_tensor(), &wt.t().unwrap()).unwrap();
            (y * &up).unwrap().sum_all().unwrap().backward().unwrap()
        };
        let (g_trained, g_frozen) = (grads(w.as_tensor()), grads(&frozen));
        assert!(g_trained.get(w.as_tensor()).is_some());
        assert!(g_frozen.get(&frozen).is_none());
        let gx = |g: &candle_core::backprop::GradStore| {
            g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
        };
        assert_eq!(gx(&g_trained), gx(&g_frozen));
    }

    /// On real-valued inputs the result stays within bf16 rounding of the f32 product.
    fn close_to_f32_on_real_values(matmul_bf16: MatMul) {
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
