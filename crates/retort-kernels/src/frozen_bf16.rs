//! A frozen linear weight packed once for the bf16 GEMM: `y = x·Wᵀ` without re-packing `W`.
//!
//! With `train.matmul = "bf16"` every product packs both operands to bf16 tiles, the weight
//! included. A trained weight changes every step, so it must be; the online teacher's never does,
//! yet its 134 M weights were converted and re-laid out at every step. Here they are packed once
//! and the f32 copy is dropped, which also halves the teacher's weight memory. The products are
//! the ones the per-call packing gives, bit for bit: the same bf16 rounding and the same
//! blocking (tested in `tests/model.rs` and in each kernel).
//!
//! Inference only (no backward); in the layout of the kernel this CPU runs: AMX tiles
//! ([`amx_gemm::PackedB`]) or AVX-512 BF16 ([`vdp_gemm::PackedB`]).

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::bf16_gemm::MatRef;
use super::{amx_gemm, vdp_gemm};

/// `W (out, in)` as the pre-packed right operand `Wᵀ (in × out)`.
#[derive(Debug)]
pub struct FrozenBf16 {
    packed: Packed,
}

#[derive(Debug)]
enum Packed {
    Amx(amx_gemm::PackedB),
    Vdp(vdp_gemm::PackedB),
}

impl Packed {
    /// `(k, n)` = `(in, out)`.
    fn dims(&self) -> (usize, usize) {
        match self {
            Packed::Amx(p) => p.dims(),
            Packed::Vdp(p) => p.dims(),
        }
    }
}

impl FrozenBf16 {
    /// Packs an f32 CPU weight `(out, in)`. Needs [`super::bf16_gemm::available`].
    pub fn new(w: &Tensor) -> candle_core::Result<Self> {
        if !super::bf16_gemm::available() {
            candle_core::bail!(
                "frozen bf16 weight: this CPU has neither AMX tiles nor AVX-512 BF16"
            );
        }
        let (out, inp) = w.dims2()?;
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        // Wᵀ[i][j] = W[j][i] = data[j·in + i].
        let b = MatRef {
            data: &data,
            offset: 0,
            rs: 1,
            cs: inp,
        };
        let threads = candle_core::utils::get_num_threads();
        let packed = if amx_gemm::available() {
            Packed::Amx(amx_gemm::PackedB::new(inp, out, b, threads))
        } else {
            Packed::Vdp(vdp_gemm::PackedB::new(inp, out, b, threads))
        };
        Ok(Self { packed })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        let (k, n) = self.packed.dims();
        (n, k)
    }
}

impl CustomOp1 for FrozenBf16 {
    fn name(&self) -> &'static str {
        "frozen-bf16-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (k, n) = self.packed.dims();
        let CpuStorage::F32(data) = s else {
            candle_core::bail!(
                "frozen bf16 linear: the input must be f32, got {:?}",
                s.dtype()
            );
        };
        let dims = l.dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("frozen bf16 linear: input {dims:?} against a weight of width {k}");
        }
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen bf16 linear: the input must be contiguous");
        };
        let m = (end - start) / k;
        let a = MatRef {
            data,
            offset: start,
            rs: k,
            cs: 1,
        };
        let mut c: Vec<f32> = Vec::with_capacity(m * n);
        let out: &mut [MaybeUninit<f32>] = &mut c.spare_capacity_mut()[..m * n];
        let threads = candle_core::utils::get_num_threads();
        match &self.packed {
            Packed::Amx(p) => amx_gemm::gemm_packed_b_uninit(m, a, p, out, threads),
            Packed::Vdp(p) => vdp_gemm::gemm_packed_b_uninit(m, a, p, out, threads),
        }
        // SAFETY: `gemm_packed_b_uninit` writes all m·n values.
        #[allow(unsafe_code)]
        unsafe {
            c.set_len(m * n)
        };
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(c), Shape::from(shape)))
    }
}
