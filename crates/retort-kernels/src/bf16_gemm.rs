//! `C (m×n) = A (m×k) · B (k×n)` with bf16 products and f32 accumulation: what PyTorch's bf16
//! autocast does on a CPU, without the bf16 copies.
//!
//! candle 0.11 has no bf16 GEMM on the CPU (it widens bf16 to f32 and multiplies in f32), so
//! this is ours; `cargo bench -p retort-kernels --bench kernels -- gemm` measures it against
//! candle's f32 GEMM on the training shapes. Inputs and output stay f32: each operand is rounded
//! to bf16 (round to nearest even) while it is packed, so a training step keeps f32 master
//! weights and f32 activations and only the multiplies run at bf16 precision.
//!
//! This file holds the contract, the dispatch and the portable reference: the kernels are
//! [`super::amx_gemm`] (AMX tiles, where the CPU has them) and [`super::vdp_gemm`] (AVX-512 BF16,
//! `vdpbf16ps`).
//!
//! Shapes: `A (m, k)`, `B (k, n)`, `C (m, n)` row-major contiguous; A and B may have any strides.

// The output casts between `f32` and `MaybeUninit<f32>`; each unsafe block states its invariant.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

/// A read-only strided matrix view: element (i, j) is `data[offset + i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

impl MatRef<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.offset + i * self.rs + j * self.cs]
    }
}

/// Whether this CPU runs a bf16 GEMM: AMX tiles ([`super::amx_gemm`]) or AVX-512 BF16.
pub fn available() -> bool {
    super::amx_gemm::available() || vdpbf16ps_available()
}

/// Whether this CPU runs the `vdpbf16ps` kernel ([`super::vdp_gemm`]: AVX-512F and AVX-512 BF16).
pub fn vdpbf16ps_available() -> bool {
    super::vdp_gemm::available()
}

/// f32 → bf16 bits, round to nearest even (as `half::bf16::from_f32` and `vcvtne2ps2bf16`,
/// except that this keeps subnormals, which the hardware flushes in the products anyway).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16 rounding of `x` (for references and tests).
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

#[inline(always)]
pub(super) fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// `C = A · B`; `c` is row-major `(m, n)` and is overwritten. Runs on AMX tiles where the CPU
/// has them, else on AVX-512 BF16. Panics if the CPU has neither ([`available`]) or the views
/// are out of bounds; callers check both.
pub fn gemm(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], threads: usize) {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and `gemm_uninit` writes only
    // initialised values, so `c` stays initialised.
    let c = unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) };
    gemm_uninit(m, n, k, a, b, c, threads);
}

/// [`gemm()`] into memory that need not be initialised (an output tensor's fresh buffer): both
/// kernels write every element without reading it first.
pub fn gemm_uninit(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [MaybeUninit<f32>],
    threads: usize,
) {
    if super::amx_gemm::available() {
        super::amx_gemm::gemm_uninit(m, n, k, a, b, c, threads);
    } else {
        super::vdp_gemm::gemm_uninit(m, n, k, a, b, c, threads);
    }
}

/// [`gemm()`] on AVX-512 BF16 (`vdpbf16ps`) whatever else the CPU has. Panics unless
/// [`vdpbf16ps_available`].
pub fn gemm_vdpbf16ps(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    threads: usize,
) {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the kernel writes only
    // initialised values.
    let c = unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) };
    super::vdp_gemm::gemm_uninit(m, n, k, a, b, c, threads);
}

/// The portable reference of [`gemm()`]: the same contract (operands rounded to bf16, products
/// summed in f32, every element of `c` written) in plain scalar Rust, on any CPU. Tests hold the
/// SIMD and AMX kernels to it; [`crate::matmul`] can run on it for the same purpose.
pub fn gemm_scalar_uninit(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [MaybeUninit<f32>],
) {
    assert_eq!(c.len(), m * n);
    for i in 0..m {
        for j in 0..n {
            let s = (0..k).fold(0f32, |s, p| {
                round_bf16(a.at(i, p)).mul_add(round_bf16(b.at(p, j)), s)
            });
            c[i * n + j] = MaybeUninit::new(s);
        }
    }
}

/// [`gemm_scalar_uninit`] into initialised memory (the signature of [`gemm()`]; one thread).
pub fn gemm_scalar(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], _: usize) {
    for (i, row) in c.chunks_mut(n.max(1)).enumerate().take(m) {
        for (j, out) in row.iter_mut().enumerate() {
            *out = (0..k).fold(0f32, |s, p| {
                round_bf16(a.at(i, p)).mul_add(round_bf16(b.at(p, j)), s)
            });
        }
    }
}

/// A raw pointer into C that threads share; each writes a disjoint set of elements (rows or
/// columns here, 32×32 blocks in [`super::amx_gemm`]).
#[derive(Clone, Copy)]
pub(super) struct CPtr(pub(super) *mut f32);
// SAFETY: the threads of both GEMMs write disjoint parts of C, and their scopes join them before
// `c` is used again.
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}
impl CPtr {
    pub(super) fn add(self, off: usize) -> CPtr {
        // SAFETY: callers pass an offset inside C (a row, column or block start below m·n).
        CPtr(unsafe { self.0.add(off) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 reference of A·B on bf16-rounded inputs.
    fn reference(m: usize, n: usize, k: usize, a: MatRef, b: MatRef) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += round_bf16(a.at(i, p)) as f64 * round_bf16(b.at(p, j)) as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    type Gemm = fn(usize, usize, usize, MatRef, MatRef, &mut [f32], usize);

    use crate::testing::uniform as values;

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: rounds up to even.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(-2.5), 0xc020);
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(
            round_bf16(1.0 + 1.0 / 128.0 + 1.0 / 1024.0),
            1.0 + 1.0 / 128.0
        );
    }

    /// A `B` packed once ([`amx_gemm::PackedB`]) gives the per-call GEMM's results bit for bit,
    /// whichever operand is the one packed whole and across k blocks.
    ///
    /// [`amx_gemm::PackedB`]: crate::amx_gemm::PackedB
    #[test]
    #[cfg_attr(not(retort_cpu_amx), ignore = "this CPU has no AMX tiles")]
    fn amx_prepacked_b_equals_per_call_packing() {
        use crate::amx_gemm;
        crate::testing::require(amx_gemm::available(), "AMX tiles");
        for &(m, n, k) in &[
            (5, 63, 3),
            (64, 96, 2 * 1024 + 33),
            (200, 33, 31),
            (33, 200, 1025),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let ar = MatRef {
                data: &a,
                offset: 0,
                rs: k,
                cs: 1,
            };
            // B as a weight's transpose: stored (n, k), read with rs = 1.
            let br = MatRef {
                data: &b,
                offset: 0,
                rs: 1,
                cs: k,
            };
            for threads in [1, 2, 3] {
                let mut want = vec![f32::NAN; m * n];
                gemm(m, n, k, ar, br, &mut want, threads); // on AMX (checked above)
                let packed = amx_gemm::PackedB::new(k, n, br, threads);
                let mut got: Vec<MaybeUninit<f32>> = vec![MaybeUninit::new(f32::NAN); m * n];
                amx_gemm::gemm_packed_b_uninit(m, ar, &packed, &mut got, threads);
                // SAFETY: initialised above and overwritten by the GEMM.
                let got: Vec<f32> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
                assert_eq!(got, want, "m={m} n={n} k={k} threads={threads}");
            }
        }
    }

    /// Small integers are exact in bf16 and their products and sums exact in f32, so the kernel
    /// must match the reference bit for bit, at every edge case of the blocking.
    fn exact_on_integers_at_all_edges(name: &str, gemm: Gemm) {
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 63, 3),
            (6, 64, 2),
            (7, 65, 257),
            (97, 130, 513),
            (13, 1030, 40),
            // AMX: whole 32×32 blocks, several k blocks (1024) with an odd tail, and either
            // operand the one packed whole.
            (64, 96, 2 * 1024 + 33),
            (200, 33, 31),
            (33, 200, 1025),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 + 3) % 9) as f32 - 4.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 + 1) % 7) as f32 - 3.0).collect();
            let (ar, br) = (
                MatRef {
                    data: &a,
                    offset: 0,
                    rs: k,
                    cs: 1,
                },
                MatRef {
                    data: &b,
                    offset: 0,
                    rs: n,
                    cs: 1,
                },
            );
            let want = reference(m, n, k, ar, br);
            for threads in [1, 2, 3] {
                let mut c = vec![f32::NAN; m * n];
                gemm(m, n, k, ar, br, &mut c, threads);
                assert_eq!(c, want, "{name} m={m} n={n} k={k} threads={threads}");
            }
        }
    }

    /// Transposed and offset views (how a linear layer's backward reads them) give the same
    /// result as contiguous copies, and random values stay within f32 accumulation error of the
    /// f64 reference on the same bf16-rounded inputs.
    fn strided_views_match_the_reference(name: &str, gemm: Gemm) {
        for (m, n, k) in [(37, 75, 300), (75, 37, 1100)] {
            // A stored transposed (k, m) after 5 leading values; B stored as (n, k) = Bᵀ;
            // and both again with neither stride 1 (every other value of a wider array).
            let at = values(5 + k * m, 1);
            let bt = values(n * k, 2);
            let wide_a = values(2 * m * k, 3);
            let wide_b = values(2 * k * n, 4);
            let cases = [
                (
                    MatRef {
                        data: &at,
                        offset: 5,
                        rs: 1,
                        cs: m,
                    },
                    MatRef {
                        data: &bt,
                        offset: 0,
                        rs: 1,
                        cs: k,
                    },
                ),
                (
                    MatRef {
                        data: &wide_a,
                        offset: 1,
                        rs: 2 * k,
                        cs: 2,
                    },
                    MatRef {
                        data: &wide_b,
                        offset: 0,
                        rs: 2 * n,
                        cs: 2,
                    },
                ),
            ];
            for (a, b) in cases {
                let want = reference(m, n, k, a, b);
                let mut c = vec![0f32; m * n];
                gemm(m, n, k, a, b, &mut c, 2);
                for (x, y) in c.iter().zip(&want) {
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "{name}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// The portable reference, on any CPU.
    #[test]
    fn scalar_is_exact_on_integers_and_reads_strided_views() {
        exact_on_integers_at_all_edges("scalar", gemm_scalar);
        strided_views_match_the_reference("scalar", gemm_scalar);
        let (m, n, k) = (7, 65, 257);
        let (a, b) = (values(m * k, 5), values(k * n, 6));
        let (ar, br) = (
            MatRef {
                data: &a,
                offset: 0,
                rs: k,
                cs: 1,
            },
            MatRef {
                data: &b,
                offset: 0,
                rs: n,
                cs: 1,
            },
        );
        let mut want = vec![0f32; m * n];
        gemm_scalar(m, n, k, ar, br, &mut want, 1);
        let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
        gemm_scalar_uninit(m, n, k, ar, br, &mut got);
        // SAFETY: initialised above and overwritten.
        let got: Vec<f32> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(got, want);
    }

    #[test]
    #[cfg_attr(not(retort_cpu_avx512bf16), ignore = "this CPU has no AVX-512 BF16")]
    fn vdpbf16ps_is_exact_on_integers_and_reads_strided_views() {
        crate::testing::require(vdpbf16ps_available(), "AVX-512 BF16");
        exact_on_integers_at_all_edges("vdpbf16ps", gemm_vdpbf16ps);
        strided_views_match_the_reference("vdpbf16ps", gemm_vdpbf16ps);
    }

    #[test]
    #[cfg_attr(not(retort_cpu_amx), ignore = "this CPU has no AMX tiles")]
    fn amx_is_exact_on_integers_and_reads_strided_views() {
        crate::testing::require(crate::amx_gemm::available(), "AMX tiles");
        // `gemm` runs on the tiles wherever they are available.
        exact_on_integers_at_all_edges("amx", gemm);
        strided_views_match_the_reference("amx", gemm);
    }
}
