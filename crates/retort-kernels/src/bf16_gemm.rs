//! `C (m×n) = A (m×k) · B (k×n)` with bf16 products and f32 accumulation, on AVX-512 BF16
//! (`vdpbf16ps`): what PyTorch's bf16 autocast does on a CPU, without the bf16 copies.
//!
//! candle 0.11 has no bf16 GEMM on the CPU (it widens bf16 to f32 and multiplies in f32), so
//! this is ours; `cargo bench -p retort-model --bench model -- gemm` measures it against candle's
//! f32 GEMM on the training shapes. Inputs and output stay f32: each operand is rounded to bf16
//! (round to nearest even) while it is packed, so a training step keeps f32 master weights and
//! f32 activations and only the multiplies run at bf16 precision.
//!
//! Layout (BLIS-style): for each block of `KC` rows of B, B is packed into panels of `NR` columns
//! and A into panels of `MR` rows, both as *pairs* along k (one `u32` holds the bf16 values of k
//! and k + 1, the operand shape `vdpbf16ps` wants). The micro-kernel keeps an `MR × NR` tile of C
//! in 24 zmm registers. Two threads split C along its longer side.
//!
//! Shapes: `A (m, k)`, `B (k, n)`, `C (m, n)` row-major contiguous; A and B may have any strides.

// The micro-kernel is SIMD intrinsics on raw pointers; each unsafe block states its invariant.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of C per micro-tile.
const MR: usize = 6;
/// Columns of C per micro-tile: four zmm registers of 16 f32.
const NR: usize = 64;
/// Rows of B (k) per packed block; even, so pairs never straddle two blocks.
const KC: usize = 256;
/// Rows of A per packed block (a multiple of MR).
const MC: usize = 96;
/// Columns of B per packed block (a multiple of NR).
const NC: usize = 1024;

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

/// Whether this CPU runs the `vdpbf16ps` kernel of this file (AVX-512F and AVX-512 BF16).
pub fn vdpbf16ps_available() -> bool {
    crate::cpu::features().avx512bf16
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

/// [`gemm()`] into memory that need not be initialised (an output tensor's fresh buffer): AMX
/// writes every element without reading it; the `vdpbf16ps` kernel accumulates, so there C is
/// zeroed first, once.
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
        return;
    }
    c.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just initialised, and `MaybeUninit<f32>` has f32's layout.
    let c = unsafe { &mut *(c as *mut [MaybeUninit<f32>] as *mut [f32]) };
    accumulate_vdpbf16ps(m, n, k, a, b, c, threads);
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
    c.fill(0.0);
    accumulate_vdpbf16ps(m, n, k, a, b, c, threads);
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

/// `C += A · B` on AVX-512 BF16.
fn accumulate_vdpbf16ps(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    threads: usize,
) {
    assert!(vdpbf16ps_available(), "bf16 GEMM needs AVX-512 BF16");
    assert_eq!(c.len(), m * n);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let threads = threads.clamp(1, 64);
    // Split the longer side of C; each thread packs its own part and all of the other operand.
    let split_rows = m >= n;
    let parts = if split_rows {
        threads.min(m.div_ceil(MR))
    } else {
        threads.min(n.div_ceil(NR))
    };
    if parts <= 1 {
        block(m, n, k, a, b, CPtr(c.as_mut_ptr()), n);
        return;
    }
    let unit = if split_rows { MR } else { NR };
    let len = if split_rows { m } else { n };
    let per = len.div_ceil(parts).div_ceil(unit) * unit;
    let base = CPtr(c.as_mut_ptr());
    std::thread::scope(|s| {
        for start in (0..len).step_by(per) {
            let count = per.min(len - start);
            s.spawn(move || {
                if split_rows {
                    let a = MatRef {
                        offset: a.offset + start * a.rs,
                        ..a
                    };
                    block(count, n, k, a, b, base.add(start * n), n);
                } else {
                    let b = MatRef {
                        offset: b.offset + start * b.cs,
                        ..b
                    };
                    block(m, count, k, a, b, base.add(start), n);
                }
            });
        }
    });
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

/// One thread's share: `C (m×n, row stride ldc) += A · B`, blocked and packed.
fn block(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: CPtr, ldc: usize) {
    let mut bpack = vec![0u32; KC / 2 * NC.min(n.div_ceil(NR) * NR)];
    let mut apack = vec![0u32; KC / 2 * MC];
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let kp = kc.div_ceil(2);
            pack::<NR>(nc, kc, |j, p| b.at(pc + p, jc + j), &mut bpack);
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                pack::<MR>(mc, kc, |i, p| a.at(ic + i, pc + p), &mut apack);
                for jr in (0..nc).step_by(NR) {
                    let nr = NR.min(nc - jr);
                    let bp = &bpack[jr / NR * kp * NR..][..kp * NR];
                    for ir in (0..mc).step_by(MR) {
                        let mr = MR.min(mc - ir);
                        let ap = &apack[ir / MR * kp * MR..][..kp * MR];
                        let cp = c.add((ic + ir) * ldc + jc + jr);
                        // SAFETY: `available()` was checked by `gemm`; the tile lies inside C.
                        unsafe { micro(kp, ap, bp, cp.0, ldc, mr, nr) };
                    }
                }
            }
        }
    }
}

/// Packs a block of `len` rows of A (W = MR) or columns of B (W = NR) by `kc` values of k into
/// W-wide panels of k-pairs: `out[panel][p][i] = (at(i, 2p), at(i, 2p+1))` as bf16, where
/// `at(i, k)` reads row/column i of the block at k; zero past the edges.
fn pack<const W: usize>(len: usize, kc: usize, at: impl Fn(usize, usize) -> f32, out: &mut [u32]) {
    let kp = kc.div_ceil(2);
    for (panel, i0) in (0..len).step_by(W).enumerate() {
        let dst = &mut out[panel * kp * W..][..kp * W];
        let valid = W.min(len - i0);
        for i in 0..W {
            for p in 0..kp {
                dst[p * W + i] = if i >= valid {
                    0
                } else {
                    let hi = if 2 * p + 1 < kc {
                        at(i0 + i, 2 * p + 1)
                    } else {
                        0.0
                    };
                    pair(at(i0 + i, 2 * p), hi)
                };
            }
        }
    }
}

/// `C[0..mr, 0..nr] += Apanel · Bpanel` over `kp` k-pairs.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16; `c` points at an `mr × nr` tile with row stride `ldc`
/// inside C; `a` holds `kp·MR` and `b` `kp·NR` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro(kp: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize, mr: usize, nr: usize) {
    debug_assert!(a.len() >= kp * MR && b.len() >= kp * NR);
    let mut acc = [[_mm512_setzero_ps(); 4]; MR];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for p in 0..kp {
        // SAFETY: p < kp and the panels hold kp·NR / kp·MR values.
        unsafe {
            let bq = bp.add(p * NR) as *const __m512i;
            let bv: [__m512bh; 4] = [
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bq)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bq.add(1))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bq.add(2))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bq.add(3))),
            ];
            let aq = ap.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai =
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*aq.add(i) as i32));
                for (v, r) in row.iter_mut().enumerate() {
                    *r = _mm512_dpbf16_ps(*r, ai, bv[v]);
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(mr) {
        for (v, r) in row.iter().enumerate() {
            let col = v * 16;
            if col >= nr {
                break;
            }
            // SAFETY: row i < mr and columns col.. < nr are inside the tile.
            unsafe {
                let cp = c.add(i * ldc + col);
                if nr - col >= 16 {
                    _mm512_storeu_ps(cp, _mm512_add_ps(_mm512_loadu_ps(cp), *r));
                } else {
                    let mask: __mmask16 = (1u16 << (nr - col)) - 1;
                    let old = _mm512_maskz_loadu_ps(mask, cp);
                    _mm512_mask_storeu_ps(cp, mask, _mm512_add_ps(old, *r));
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro(_: usize, _: &[u32], _: &[u32], _: *mut f32, _: usize, _: usize, _: usize) {
    unreachable!("bf16 GEMM is x86_64-only; `available()` is false elsewhere")
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

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

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
