//! Q8_0 weights times f32 activations, `y = x·Wᵀ`, for decoding: a few rows per product, every
//! weight read once per token.
//!
//! candle's repacked x86 kernel for Q8_0 quantizes the activations in blocks of 256 (`QK_K`), so it
//! needs an input width that is a multiple of 256. SmolLM2's hidden size 576 is not, and retort
//! padded those weights with zero columns: a third more bytes to read per token for six of the
//! seven projections and the LM head, and reading the weights is what a decoding step costs. Here
//! the activations are quantized in blocks of 32, the weight's own block, so any input width that
//! is a multiple of 32 runs unpadded.
//!
//! Weight layout: tiles of 16 output rows. Tile `t`, block `b` holds 16 rows × 32 values as
//! `u8 = q + 128`, ordered `[group of 4 values (8)][row (16)][4]`: one aligned 64-byte load feeds
//! one `vpdpbusd`, which adds four products into each of the 16 rows. The 16 rows' f16 scales sit
//! in a parallel array. The +128 makes the weights unsigned, as `vpdpbusd` wants; the activations'
//! block sums take it out again: Σ(q + 128)·a = Σq·a + 128·Σa.
//!
//! Activations: each row's block of 32 values is quantized to i8 with scale max|x|/127, rounded to
//! nearest (ties to even). The integer dot products are exact; the result differs from the f32
//! product with the dequantized weights only by the activations' rounding, as in llama.cpp and
//! candle.

#![allow(unsafe_code)] // AVX-512 VNNI intrinsics; every entry checks `available()` first

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

/// Values per Q8_0 block (GGUF's `QK8_0`).
pub const BLOCK: usize = 32;
/// Output rows per tile: one 512-bit vector of i32 sums.
pub const TILE: usize = 16;
/// Bytes of one Q8_0 block as GGUF stores it: an f16 scale, then 32 × i8.
const BLOCK_BYTES: usize = 2 + BLOCK;
/// Activation rows per kernel call (each row keeps two integer and one float accumulator).
const MAX_ROWS: usize = 4;

/// Whether this CPU runs the kernel (AVX-512 with VNNI) and the `q8_kernel` switch is on
/// ([`crate::cpu`]; `RETORT_Q8_KERNEL=0` for the CLI); otherwise the model uses candle's quantized
/// matmul with padded weights.
pub fn available() -> bool {
    crate::cpu::q8_kernel()
}

/// 64 bytes: one `vpdpbusd` operand.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Lane([u8; 64]);

/// A Q8_0 weight `(n, k)` in the tile layout of the module docs; use it as a [`CustomOp1`] on an
/// f32 input `(..., k)`, which gives `(..., n)`.
#[derive(Debug)]
pub struct PackedQ8_0 {
    n: usize,
    k: usize,
    /// `(n / 16) · (k / 32) · 8` lanes: tile-major, then block, then group of 4 values.
    lanes: Vec<Lane>,
    /// f16 bits of the scales, `[tile][block][row in tile]`.
    scales: Vec<u16>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lane")
    }
}

impl PackedQ8_0 {
    /// Whether a weight `(n, k)` fits the layout: `n` a multiple of 16, `k` of 32.
    pub fn fits(n: usize, k: usize) -> bool {
        n > 0 && k > 0 && n.is_multiple_of(TILE) && k.is_multiple_of(BLOCK)
    }

    /// Repacks a Q8_0 tensor `(n, k)`; its values are kept bit for bit.
    pub fn new(q: &QTensor) -> candle_core::Result<Self> {
        let (n, k) = q.shape().dims2()?;
        if q.dtype() != GgmlDType::Q8_0 || !Self::fits(n, k) {
            candle_core::bail!(
                "PackedQ8_0: needs Q8_0 (n, k) with n a multiple of {TILE} and k of {BLOCK}, got {:?} {:?}",
                q.dtype(),
                q.shape()
            );
        }
        let data = q.data()?;
        let kb = k / BLOCK;
        if data.len() != n * kb * BLOCK_BYTES {
            candle_core::bail!(
                "PackedQ8_0: {} bytes for a ({n}, {k}) Q8_0 tensor, expected {}",
                data.len(),
                n * kb * BLOCK_BYTES
            );
        }
        let mut lanes = vec![Lane([0; 64]); n / TILE * kb * (BLOCK / 4)];
        let mut scales = vec![0u16; n * kb];
        for row in 0..n {
            let (t, r) = (row / TILE, row % TILE);
            for b in 0..kb {
                let src = &data[(row * kb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                scales[(t * kb + b) * TILE + r] = u16::from_le_bytes([src[0], src[1]]);
                for (j, &v) in src[2..].iter().enumerate() {
                    // i8 → u8 + 128 is a flip of the sign bit.
                    lanes[(t * kb + b) * (BLOCK / 4) + j / 4].0[r * 4 + j % 4] = v ^ 0x80;
                }
            }
        }
        Ok(Self {
            n,
            k,
            lanes,
            scales,
        })
    }

    /// `(n, k)`: output and input width.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `y (m, n) = x (m, k) · Wᵀ` on this CPU's threads. Panics unless [`available`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert!(available(), "q8_0-matmul needs AVX-512 VNNI");
        assert!(
            x.len() >= m * self.k,
            "q8_0-matmul: {} inputs for {m} rows of {}",
            x.len(),
            self.k
        );
        let acts = Activations::quantize(x, m, self.k);
        let mut y = vec![0f32; m * self.n];
        let row_groups = m.div_ceil(MAX_ROWS);
        let units = self.n / TILE * row_groups;
        let out = OutPtr(y.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(units, |range| {
            let out = &out;
            for unit in range {
                // Consecutive units share a tile, so its weights are still in cache for the next
                // group of rows.
                let (t, g) = (unit / row_groups, unit % row_groups);
                let m0 = g * MAX_ROWS;
                // SAFETY: `available()` was asserted above; the unit writes rows m0..m0+rows
                // of columns t·16..t·16+16 of y, disjoint from every other unit's, and y
                // outlives the pool call.
                unsafe { self.unit(&acts, t, m0, (m - m0).min(MAX_ROWS), out.0) };
            }
        });
        y
    }

    /// The portable reference of [`Self::matmul`]: the same packed weights and the same
    /// arithmetic (activations quantized per block of 32, exact integer dot products with the
    /// `+128` correction, one fused multiply-add per block in block order), in plain scalar Rust
    /// on any CPU. [`Self::matmul`] must match it bit for bit.
    pub fn matmul_scalar(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert!(
            x.len() >= m * self.k,
            "q8_0-matmul: {} inputs for {m} rows of {}",
            x.len(),
            self.k
        );
        let kb = self.k / BLOCK;
        let mut y = vec![0f32; m * self.n];
        let (mut q, mut scale, mut offset) = ([0i8; BLOCK], 0f32, 0i32);
        for i in 0..m {
            let row = &mut y[i * self.n..][..self.n];
            for b in 0..kb {
                quantize_block_scalar(
                    &x[i * self.k + b * BLOCK..][..BLOCK],
                    &mut q,
                    &mut scale,
                    &mut offset,
                );
                for (j, out) in row.iter_mut().enumerate() {
                    let (t, r) = (j / TILE, j % TILE);
                    let lanes = &self.lanes[(t * kb + b) * (BLOCK / 4)..][..BLOCK / 4];
                    let dot: i32 = (0..BLOCK)
                        .map(|p| lanes[p / 4].0[r * 4 + p % 4] as i32 * q[p] as i32)
                        .sum();
                    let ws = half::f16::from_bits(self.scales[(t * kb + b) * TILE + r]).to_f32();
                    *out = ((dot - offset) as f32).mul_add(ws * scale, *out);
                }
            }
        }
        y
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn unit(&self, a: &Activations, t: usize, m0: usize, rows: usize, y: *mut f32) {
        // SAFETY: forwarded from `matmul`.
        unsafe {
            match rows {
                1 => x86::unit::<1>(self, a, t, m0, y),
                2 => x86::unit::<2>(self, a, t, m0, y),
                3 => x86::unit::<3>(self, a, t, m0, y),
                _ => x86::unit::<4>(self, a, t, m0, y),
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn unit(&self, _: &Activations, _: usize, _: usize, _: usize, _: *mut f32) {
        unreachable!("PackedQ8_0 runs only where available() is true (x86-64)")
    }
}

/// The output pointer shared by the pool's threads.
struct OutPtr(*mut f32);
// SAFETY: each unit writes its own disjoint (rows × 16 columns) block; the pool call returns only
// after every unit is done.
unsafe impl Sync for OutPtr {}

/// Quantized activations: `q (m, k)` as i8, and per row and block the scale and 128·Σq.
struct Activations {
    k: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
    offset: Vec<i32>,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let kb = k / BLOCK;
        let mut a = Activations {
            k,
            q: vec![0; m * k],
            scale: vec![0.0; m * kb],
            offset: vec![0; m * kb],
        };
        let blocks = x[..m * k]
            .chunks_exact(BLOCK)
            .zip(a.q.chunks_exact_mut(BLOCK))
            .zip(a.scale.iter_mut().zip(a.offset.iter_mut()));
        for ((src, q), (scale, offset)) in blocks {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only called by `matmul`, which asserted `available()` (AVX-512).
            unsafe {
                x86::quantize_block(src, q, scale, offset)
            };
            #[cfg(not(target_arch = "x86_64"))]
            quantize_block_scalar(src, q, scale, offset);
        }
        a
    }
}

/// The activation rounding, in plain Rust (the reference for the AVX-512 version).
fn quantize_block_scalar(src: &[f32], q: &mut [i8], scale: &mut f32, offset: &mut i32) {
    let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(src) {
        let r = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32;
        *q = r as i8;
        sum += r;
    }
    *scale = d;
    *offset = 128 * sum;
}

impl CustomOp1 for PackedQ8_0 {
    fn name(&self) -> &'static str {
        "q8_0-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if !available() {
            candle_core::bail!("q8_0-matmul: this CPU lacks AVX-512 VNNI (or RETORT_Q8_KERNEL=0)");
        }
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("q8_0-matmul: the input must be f32, got {:?}", s.dtype());
        };
        let dims = l.dims();
        if dims.last() != Some(&self.k) {
            candle_core::bail!(
                "q8_0-matmul: input {dims:?} against a weight of width {}",
                self.k
            );
        }
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("q8_0-matmul: the input must be contiguous");
        };
        let m = (end - start) / self.k;
        let y = self.matmul(&data[start..end], m);
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = self.n;
        }
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Activations, BLOCK, PackedQ8_0, TILE};

    /// One block of 32 activations: the AVX-512 twin of `quantize_block_scalar`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_block(
        src: &[f32],
        q: &mut [i8],
        scale: &mut f32,
        offset: &mut i32,
    ) {
        debug_assert!(src.len() == BLOCK && q.len() == BLOCK);
        // SAFETY: both slices hold 32 values (chunks_exact), read and written as 2 × 16.
        unsafe {
            let v0 = _mm512_loadu_ps(src.as_ptr());
            let v1 = _mm512_loadu_ps(src.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let d = amax / 127.0;
            let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
            // The default rounding mode: nearest, ties to even.
            let q0 = _mm512_min_epi32(
                _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), lo),
                hi,
            );
            let q1 = _mm512_min_epi32(
                _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)), lo),
                hi,
            );
            _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128(
                q.as_mut_ptr().add(16) as *mut __m128i,
                _mm512_cvtepi32_epi8(q1),
            );
            *scale = d;
            *offset = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
    }

    /// `y[m0 + r][16t .. 16t + 16]` for `r < ROWS`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn unit<const ROWS: usize>(
        w: &PackedQ8_0,
        a: &Activations,
        t: usize,
        m0: usize,
        y: *mut f32,
    ) {
        let kb = w.k / BLOCK;
        let groups = BLOCK / 4;
        // SAFETY (whole body): t < n/16 and m0 + ROWS ≤ m (from `matmul`), so every lane, scale,
        // activation and output index below is in bounds; lanes are 64-byte aligned.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); ROWS];
            for b in 0..kb {
                let lanes = w.lanes.as_ptr().add((t * kb + b) * groups) as *const __m512i;
                // Two integer sums per row (even and odd groups) halve the dependency chain.
                let mut even = [_mm512_setzero_si512(); ROWS];
                let mut odd = [_mm512_setzero_si512(); ROWS];
                for g in (0..groups).step_by(2) {
                    let w0 = _mm512_load_si512(lanes.add(g));
                    let w1 = _mm512_load_si512(lanes.add(g + 1));
                    for r in 0..ROWS {
                        let q = a.q.as_ptr().add((m0 + r) * a.k + b * BLOCK + g * 4) as *const i32;
                        let q0 = _mm512_set1_epi32(q.read_unaligned());
                        let q1 = _mm512_set1_epi32(q.add(1).read_unaligned());
                        even[r] = _mm512_dpbusd_epi32(even[r], w0, q0);
                        odd[r] = _mm512_dpbusd_epi32(odd[r], w1, q1);
                    }
                }
                let ws = _mm512_cvtph_ps(_mm256_loadu_si256(
                    w.scales.as_ptr().add((t * kb + b) * TILE) as *const __m256i,
                ));
                for r in 0..ROWS {
                    let i = (m0 + r) * kb + b;
                    let sum = _mm512_sub_epi32(
                        _mm512_add_epi32(even[r], odd[r]),
                        _mm512_set1_epi32(a.offset[i]),
                    );
                    let s = _mm512_mul_ps(ws, _mm512_set1_ps(a.scale[i]));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, acc[r]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(y.add((m0 + r) * w.n + t * TILE), *acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    type Matmul = fn(&PackedQ8_0, &[f32], usize) -> Vec<f32>;

    /// The portable reference runs everywhere; the AVX-512 VNNI kernel where the CPU has it.
    const SCALAR: Matmul = PackedQ8_0::matmul_scalar;

    fn native() -> Matmul {
        crate::testing::require(available(), "AVX-512 VNNI");
        PackedQ8_0::matmul
    }

    #[test]
    fn scalar_reference_is_exact_and_matches_the_f64_arithmetic() {
        exact_on_integers_at_every_row_count_and_width(SCALAR);
        matches_the_reference_arithmetic_on_real_values(SCALAR);
        each_row_is_computed_alone(SCALAR);
    }

    #[test]
    #[cfg_attr(
        not(all(retort_cpu_avx512vnni, retort_cpu_avx512bw)),
        ignore = "this CPU has no AVX-512 VNNI"
    )]
    fn vnni_kernel_is_exact_and_matches_the_scalar_reference_bit_for_bit() {
        let native = native();
        exact_on_integers_at_every_row_count_and_width(native);
        matches_the_reference_arithmetic_on_real_values(native);
        each_row_is_computed_alone(native);
        let (n, k) = (64, 576);
        let packed = PackedQ8_0::new(&q8(&uniform(n * k, 21, 0.7), n, k)).unwrap();
        for m in [1, 3, 4, 6] {
            let x = uniform(m * k, 22 + m as u64, 2.0);
            assert_eq!(native(&packed, &x, m), packed.matmul_scalar(&x, m), "m {m}");
        }
    }

    /// f64 reference of the kernel's arithmetic: the weights dequantized, the activations
    /// quantized by `quantize_block_scalar`.
    fn reference(w: &QTensor, x: &[f32], m: usize) -> Vec<f64> {
        let (n, k) = w.shape().dims2().unwrap();
        let wd = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut xq = vec![0f64; m * k];
        for (src, dst) in x.chunks_exact(BLOCK).zip(xq.chunks_exact_mut(BLOCK)) {
            let (mut q, mut s, mut o) = ([0i8; BLOCK], 0f32, 0i32);
            quantize_block_scalar(src, &mut q, &mut s, &mut o);
            for (d, q) in dst.iter_mut().zip(q) {
                *d = q as f64 * s as f64;
            }
        }
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| xq[i * k + p] * wd[j * k + p] as f64).sum();
            }
        }
        y
    }

    /// Deterministic values in `[-amp, amp)`.
    fn uniform(len: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    fn q8(w: &[f32], n: usize, k: usize) -> QTensor {
        let t = Tensor::from_slice(w, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::Q8_0).unwrap()
    }

    /// Integers whose every block of 32 reaches ±127 quantize exactly (scale 1), so the kernel's
    /// result must equal the f32 product of the plain matrices, bit for bit.
    fn exact_values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|i| {
                if i % BLOCK == (seed as usize) % BLOCK {
                    return if i % 64 < 32 { 127.0 } else { -127.0 };
                }
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % 255) as f32 - 127.0
            })
            .collect()
    }

    fn exact_on_integers_at_every_row_count_and_width(matmul: Matmul) {
        // k = 576 is SmolLM2's width (not a multiple of 256); 32 is one block; n = 16 one tile.
        for &(n, k) in &[(16, 32), (48, 576), (32, 96), (192, 1536)] {
            let w = exact_values(n * k, 3);
            let packed = PackedQ8_0::new(&q8(&w, n, k)).unwrap();
            for m in [1, 2, 3, 4, 5, 8, 9] {
                let x = exact_values(m * k, 11 + m as u64);
                let y = matmul(&packed, &x, m);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                            .sum();
                        assert_eq!(y[i * n + j] as f64, want, "n {n} k {k} m {m} at ({i}, {j})");
                    }
                }
            }
        }
    }

    fn matches_the_reference_arithmetic_on_real_values(matmul: Matmul) {
        let (n, k) = (64, 576);
        let wq = q8(&uniform(n * k, 1, 0.5), n, k);
        let packed = PackedQ8_0::new(&wq).unwrap();
        for m in [1, 4, 7] {
            let mut x = uniform(m * k, 2, 3.0);
            // An all-zero block (scale 0) in the last row.
            x[(m - 1) * k..][..BLOCK].iter_mut().for_each(|v| *v = 0.0);
            let y = matmul(&packed, &x, m);
            let want = reference(&wq, &x, m);
            for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "m {m} at {i}: {got} vs {want}"
                );
            }
        }
    }

    fn each_row_is_computed_alone(matmul: Matmul) {
        // Batched decoding must give a row the same bits as decoding it alone: no row's
        // quantization or summation order may depend on the other rows of the call.
        let (n, k) = (32, 576);
        let packed = PackedQ8_0::new(&q8(&uniform(n * k, 8, 1.0), n, k)).unwrap();
        let m = 7;
        let x = uniform(m * k, 9, 2.0);
        let all = matmul(&packed, &x, m);
        for i in 0..m {
            let alone = matmul(&packed, &x[i * k..][..k], 1);
            assert_eq!(&all[i * n..][..n], &alone[..], "row {i}");
        }
    }

    #[test]
    #[cfg_attr(
        not(all(retort_cpu_avx512vnni, retort_cpu_avx512bw)),
        ignore = "this CPU has no AVX-512 VNNI"
    )]
    fn as_an_op_it_tracks_candle_quantized_matmul() {
        native();
        // candle quantizes the activations in blocks of 256, we in blocks of 32: both are close
        // to the f32 product with the dequantized weights, not equal to each other.
        let (n, k) = (32, 512);
        let wq = q8(&uniform(n * k, 5, 1.0), n, k);
        let x = Tensor::from_vec(uniform(6 * k, 6, 1.0), (2, 3, k), &Device::Cpu).unwrap();
        let ours = x.apply_op1_no_bwd(&PackedQ8_0::new(&wq).unwrap()).unwrap();
        assert_eq!(ours.dims(), &[2, 3, n]);
        let wd = wq.dequantize(&Device::Cpu).unwrap();
        let exact = x.broadcast_matmul(&wd.t().unwrap()).unwrap();
        let candle = QMatMul::from_qtensor(wq).unwrap().forward(&x).unwrap();
        let err = |a: &Tensor| -> f32 {
            (a - &exact)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let scale: f32 = exact.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(
            err(&ours) < 0.01 * scale,
            "ours {} vs scale {scale}",
            err(&ours)
        );
        assert!(err(&candle) < 0.01 * scale, "candle {}", err(&candle));
        // Finer activation blocks round no worse than candle's.
        assert!(
            err(&ours) <= 1.5 * err(&candle),
            "ours {} candle {}",
            err(&ours),
            err(&candle)
        );
    }

    #[test]
    fn refuses_shapes_and_dtypes_it_cannot_pack() {
        let w = Tensor::zeros((16, 48), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0);
        // 48 is not a multiple of 32: GGUF's Q8_0 refuses it already, or we do.
        if let Ok(q) = q {
            assert!(PackedQ8_0::new(&q).is_err());
        }
        let w = Tensor::zeros((8, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(
            PackedQ8_0::new(&q)
                .unwrap_err()
                .to_string()
                .contains("multiple of 16")
        );
        let q = QTensor::quantize(
            &Tensor::zeros((16, 256), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::Q4K,
        )
        .unwrap();
        assert!(PackedQ8_0::new(&q).is_err());
    }
}
