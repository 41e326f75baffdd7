//! `C (m×n) = A (m×k) · B (k×n)` with bf16 products and f32 accumulation on AVX-512 BF16
//! (`vdpbf16ps`): the contract of [`super::bf16_gemm::gemm`] on CPUs without AMX tiles (AMD Zen 4
//! and 5, Intel Cooper Lake and Ice Lake servers).
//!
//! Blocking (the AMX kernel's, [`super::amx_gemm`], with a register-tiled micro-kernel): k in
//! blocks of `KC`; per block the operand with fewer elements is packed whole, by all threads,
//! and shared; the other is streamed one panel at a time, each thread taking a contiguous range
//! of panels, so every element of either operand is converted once per call (the previous
//! kernel re-packed A for every 1,024 columns of B, both threads packed all of B, one element at
//! a time: a quarter of a Qwen2.5-0.5B LoRA step went to packing). Threads come from rayon's pool
//! (candle's), not fresh ones per call.
//!
//! Panels: rows of A in panels of `MR`, columns of B in panels of `NR`, both as k-pairs (one
//! `u32` holds the bf16 values at k and k + 1, the operand shape `vdpbf16ps` wants), pair-major:
//! line `l`'s pair `p` at `panel[p·W + l]`, zero past every edge. Packing converts 16 lines × 16
//! pairs at a time with `vcvtne2ps2bf16` (round to nearest even, as
//! [`super::bf16_gemm::bf16_bits`]) where one of the operand's strides is 1, transposing in
//! registers where it must; other strides go element by element.
//!
//! The micro-kernel keeps an `MR × NR` tile of C in 24 zmm registers; the first k block stores
//! C without reading it, so an output buffer needs no zeroing.

// SIMD intrinsics on raw pointers shared by threads; each unsafe block states its invariant.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;
use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::bf16_gemm::{CPtr, MatRef, pair};

/// Rows of C per micro-tile.
const MR: usize = 6;
/// Columns of C per micro-tile: four zmm registers of 16 f32.
const NR: usize = 64;
/// k values per block (512 pairs): a packed B panel is 128 KB (in L2 while the micro-kernel runs
/// over A panels), an A panel 12 KB. Measured against 256, 512 and 768 (`cargo bench -p
/// retort-kernels --bench kernels -- gemm`, this repository's Zen 5 host): the larger block
/// wins by up to 1.5× on the LM head's shape, where every extra block reads and writes all of C
/// again (155 MB for 256 rows of Qwen2.5's vocabulary), and L2 feeds the micro-kernel as fast
/// as L1 does (it runs at the same rate on a 128 KB panel as on a 32 KB one).
const KC: usize = 1024;
/// A panels a thread packs at a time when A is the streamed operand (384 KB, in L2).
const A_CHUNK: usize = 32;

/// Whether this CPU runs this kernel (AVX-512F and AVX-512 BF16).
pub fn available() -> bool {
    crate::cpu::features().avx512bf16
}

/// `u32` pairs in one packed panel of `width` lines and `kc` k values.
fn panel_len(width: usize, kc: usize) -> usize {
    width * kc.div_ceil(2)
}

/// `C = A · B` into memory that need not be initialised: every element of `c` is written.
/// Panics unless [`available`] or if the views are out of bounds.
pub fn gemm_uninit(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [MaybeUninit<f32>],
    threads: usize,
) {
    run(m, n, k, a, BSource::Strided(b), c, threads);
}

/// `B (k×n)` packed once, every k block, in the panel layout [`gemm_packed_b_uninit`] streams:
/// for a `B` that does not change between calls (a frozen weight). The products are those of
/// [`gemm_uninit`] on the same `B`, bit for bit.
#[derive(Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    /// Per k block of `KC`: the `⌈n/NR⌉` panels of that block, one after the other.
    blocks: Vec<Vec<u32>>,
}

impl PackedB {
    /// Packs `b (k×n)` (any strides) on `threads` threads. Needs [`available`].
    pub fn new(k: usize, n: usize, b: MatRef, threads: usize) -> Self {
        assert!(available(), "bf16 GEMM needs AVX-512 BF16");
        let np = n.div_ceil(NR);
        let blocks = (0..k)
            .step_by(KC)
            .map(|pc| {
                let kc = KC.min(k - pc);
                let len = panel_len(NR, kc);
                let mut out = vec![0u32; np * len];
                for_panels(&mut out, len, threads, |p, dst| {
                    pack_b(b, n, p * NR, pc, kc, dst)
                });
                out
            })
            .collect();
        Self { k, n, blocks }
    }

    /// `(k, n)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.len() * 4).sum()
    }
}

/// `C (m×n) = A · B` for a pre-packed `B` ([`PackedB`]); `c` as in [`gemm_uninit`].
pub fn gemm_packed_b_uninit(
    m: usize,
    a: MatRef,
    b: &PackedB,
    c: &mut [MaybeUninit<f32>],
    threads: usize,
) {
    run(m, b.n, b.k, a, BSource::Packed(b), c, threads);
}

/// Where the GEMM gets B's panels: packed per call from a strided view, or pre-packed.
#[derive(Clone, Copy)]
enum BSource<'a> {
    Strided(MatRef<'a>),
    Packed(&'a PackedB),
}

/// Runs `f(panel_index, panel)` over the `len`-long panels of `out`, a contiguous range of
/// panels per thread (rayon's pool).
fn for_panels(out: &mut [u32], len: usize, threads: usize, f: impl Fn(usize, &mut [u32]) + Sync) {
    let count = out.len() / len.max(1);
    let parts = threads.clamp(1, 64).min(count);
    if parts <= 1 {
        for (p, dst) in out.chunks_mut(len).enumerate() {
            f(p, dst);
        }
        return;
    }
    let per = count.div_ceil(parts);
    let f = &f;
    rayon::scope(|s| {
        for (t, chunk) in out.chunks_mut(per * len).enumerate() {
            s.spawn(move |_| {
                for (i, dst) in chunk.chunks_mut(len).enumerate() {
                    f(t * per + i, dst);
                }
            });
        }
    });
}

fn run(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: BSource,
    c: &mut [MaybeUninit<f32>],
    threads: usize,
) {
    assert!(available(), "bf16 GEMM needs AVX-512 BF16");
    assert_eq!(c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(MaybeUninit::new(0.0));
        return;
    }
    let threads = threads.clamp(1, 64);
    let (mp, np) = (m.div_ceil(MR), n.div_ceil(NR));
    // Pack the smaller operand whole; stream the other.
    let a_whole = m <= n;
    let (whole_width, whole_count, stream_width, stream_count) = if a_whole {
        (MR, mp, NR, np)
    } else {
        (NR, np, MR, mp)
    };
    let cp = CPtr(c.as_mut_ptr().cast::<f32>());
    // One buffer for every k block (the first is the largest); a pre-packed B that is the whole
    // operand needs none.
    let packed_whole = matches!(b, BSource::Packed(_)) && !a_whole;
    let mut whole_buf = if packed_whole {
        Vec::new()
    } else {
        vec![0u32; whole_count * panel_len(whole_width, KC.min(k))]
    };
    for (blk, pc) in (0..k).step_by(KC).enumerate() {
        let kc = KC.min(k - pc);
        let kp = kc.div_ceil(2);
        let (whole_len, stream_len) = (whole_width * kp, stream_width * kp);
        let whole: &[u32] = match b {
            BSource::Packed(p) if !a_whole => &p.blocks[blk],
            _ => {
                let whole = &mut whole_buf[..whole_count * whole_len];
                for_panels(whole, whole_len, threads, |p, dst| match b {
                    _ if a_whole => pack_a(a, m, p * MR, pc, kc, dst),
                    BSource::Strided(b) => pack_b(b, n, p * NR, pc, kc, dst),
                    BSource::Packed(_) => unreachable!("a pre-packed whole B is not packed"),
                });
                whole
            }
        };
        let accumulate = blk > 0;
        // C's tile of A panel `ip` and B panel `jp` (+)= their product.
        let tile = move |ip: usize, jp: usize, ap: &[u32], bp: &[u32]| {
            let (i0, j0) = (ip * MR, jp * NR);
            // SAFETY: `available()` was checked; the panels hold kp·MR and kp·NR values; the
            // tile (i0.., j0..) of its rows × cols lies inside C, and no other thread writes it
            // (threads own disjoint ranges of streamed panels).
            unsafe {
                micro(
                    kp,
                    ap,
                    bp,
                    cp.add(i0 * n + j0).0,
                    n,
                    MR.min(m - i0),
                    NR.min(n - j0),
                    accumulate,
                )
            };
        };
        let stream = move |range: Range<usize>| {
            if a_whole {
                // Per streamed B panel (L1), every A panel of the whole (L2).
                let mut panel = vec![0u32; stream_len];
                for jp in range {
                    let bp: &[u32] = match b {
                        BSource::Strided(b) => {
                            pack_b(b, n, jp * NR, pc, kc, &mut panel);
                            &panel
                        }
                        BSource::Packed(p) => &p.blocks[blk][jp * stream_len..][..stream_len],
                    };
                    for ip in 0..whole_count {
                        let ap = &whole[ip * whole_len..][..whole_len];
                        tile(ip, jp, ap, bp);
                    }
                }
            } else {
                // A chunk of this thread's A panels packed (L2), then per B panel of the whole
                // (L1), every A panel of the chunk.
                let mut chunk = vec![0u32; A_CHUNK * stream_len];
                for first in range.clone().step_by(A_CHUNK) {
                    let count = A_CHUNK.min(range.end - first);
                    for (i, dst) in chunk.chunks_mut(stream_len).take(count).enumerate() {
                        pack_a(a, m, (first + i) * MR, pc, kc, dst);
                    }
                    for jp in 0..whole_count {
                        let bp = &whole[jp * whole_len..][..whole_len];
                        for i in 0..count {
                            tile(first + i, jp, &chunk[i * stream_len..][..stream_len], bp);
                        }
                    }
                }
            }
        };
        let parts = threads.min(stream_count);
        if parts <= 1 {
            stream(0..stream_count);
        } else {
            let per = stream_count.div_ceil(parts);
            rayon::scope(|s| {
                for start in (0..stream_count).step_by(per) {
                    let end = (start + per).min(stream_count);
                    s.spawn(move |_| stream(start..end));
                }
            });
        }
    }
}

/// Packs rows `i0..i0+MR` of A (zero past `m`) at k values `pc..pc+kc`.
fn pack_a(a: MatRef, m: usize, i0: usize, pc: usize, kc: usize, out: &mut [u32]) {
    let base = a.offset + i0 * a.rs + pc * a.cs;
    pack_lines::<MR>(a.data, base, a.rs, a.cs, MR.min(m - i0), kc, out);
}

/// Packs columns `j0..j0+NR` of B (zero past `n`) at k values `pc..pc+kc`.
fn pack_b(b: MatRef, n: usize, j0: usize, pc: usize, kc: usize, out: &mut [u32]) {
    let base = b.offset + pc * b.rs + j0 * b.cs;
    pack_lines::<NR>(b.data, base, b.cs, b.rs, NR.min(n - j0), kc, out);
}

/// The shared packer: line `l < valid` at k value `q < kc` is `data[base + l·ls + q·ks]`; its
/// pair `p` (k values 2p, 2p + 1) goes to `out[p·W + l]`; every other entry of the `W × ⌈kc/2⌉`
/// panel is zero. Works in blocks of 16 lines × 16 pairs, converted with AVX-512 BF16 when the
/// block is inside the matrix and one stride is 1; edge blocks and other strides go element by
/// element ([`pair`]).
fn pack_lines<const W: usize>(
    data: &[f32],
    base: usize,
    ls: usize,
    ks: usize,
    valid: usize,
    kc: usize,
    out: &mut [u32],
) {
    let kp = kc.div_ceil(2);
    assert!(out.len() >= W * kp);
    for g0 in (0..W).step_by(16) {
        let width = 16.min(W - g0);
        let lines = valid.saturating_sub(g0).min(width);
        for p0 in (0..kp).step_by(16) {
            if lines > 0 && 2 * p0 + 32 <= kc && (ks == 1 || ls == 1) {
                let last = if ks == 1 {
                    base + (g0 + lines - 1) * ls + 2 * p0 + 31
                } else {
                    base + g0 + lines - 1 + (2 * p0 + 31) * ks
                };
                if last < data.len() {
                    // SAFETY: every read is at most `last`, inside `data`; the writes are
                    // pairs p0..p0+16 < kp of lines g0..g0+width ≤ W, inside `out`; the
                    // callers checked AVX-512 BF16.
                    unsafe { pack_block::<W>(data, base, ls, ks, g0, lines, width, p0, out) };
                    continue;
                }
            }
            for p in p0..(p0 + 16).min(kp) {
                for l in g0..g0 + width {
                    let at = |q: usize| {
                        if l < valid && q < kc {
                            data[base + l * ls + q * ks]
                        } else {
                            0.0
                        }
                    };
                    out[p * W + l] = pair(at(2 * p), at(2 * p + 1));
                }
            }
        }
    }
}

/// One block of [`pack_lines`]: `lines` (≤ `width` ≤ 16) lines from `g0`, pairs `p0..p0+16`;
/// lanes past `lines` are written as zero.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16; `ks == 1` or `ls == 1`; the block's reads and writes
/// lie inside `data` and `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_block<const W: usize>(
    data: &[f32],
    base: usize,
    ls: usize,
    ks: usize,
    g0: usize,
    lines: usize,
    width: usize,
    p0: usize,
    out: &mut [u32],
) {
    let src = data.as_ptr();
    let dst = out.as_mut_ptr();
    let store: __mmask16 = ((1u32 << width) - 1) as u16;
    let mut v = [_mm512_setzero_si512(); 16];
    // SAFETY (whole block): the caller's bounds; loads and stores are unaligned, masked lanes
    // are neither read nor written.
    unsafe {
        if ks == 1 {
            // v[i]: the 16 pairs of line g0 + i; then transposed to v[q]: pair p0 + q of the
            // 16 lines.
            for (i, vi) in v.iter_mut().enumerate().take(lines) {
                let x = src.add(base + (g0 + i) * ls + 2 * p0);
                let bf = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x.add(16)), _mm512_loadu_ps(x));
                *vi = std::mem::transmute::<__m512bh, __m512i>(bf);
            }
            v = super::amx_gemm::transpose16(v);
        } else {
            let load: __mmask16 = ((1u32 << lines) - 1) as u16;
            for (q, vq) in v.iter_mut().enumerate() {
                let k0 = 2 * (p0 + q);
                let lo = _mm512_maskz_loadu_ps(load, src.add(base + g0 + k0 * ks));
                let hi = _mm512_maskz_loadu_ps(load, src.add(base + g0 + (k0 + 1) * ks));
                let lo = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(lo));
                let hi = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(hi));
                *vq = _mm512_or_si512(
                    _mm512_cvtepu16_epi32(lo),
                    _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
                );
            }
        }
        for (q, vq) in v.iter().enumerate() {
            let at = dst.add((p0 + q) * W + g0).cast::<i32>();
            _mm512_mask_storeu_epi32(at, store, *vq);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_block<const W: usize>(
    _: &[f32],
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: &mut [u32],
) {
    unreachable!("the bf16 GEMM is x86_64-only; `available()` is false elsewhere")
}

/// `C[0..mr, 0..nr] (+)= Apanel · Bpanel` over `kp` k-pairs: added to C if `accumulate`, else
/// stored over it (C is not read).
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16; `c` points at an `mr × nr` tile with row stride `ldc`
/// inside C, initialised if `accumulate`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    kp: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
    assert!(a.len() >= kp * MR && b.len() >= kp * NR);
    let mut acc = [[_mm512_setzero_ps(); 4]; MR];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for p in 0..kp {
        // SAFETY: p < kp and the panels hold kp·NR / kp·MR values (asserted).
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
            let mask: __mmask16 = ((1u32 << (nr - col).min(16)) - 1) as u16;
            // SAFETY: row i < mr and the masked columns col.. < nr are inside the tile.
            unsafe {
                let cp = c.add(i * ldc + col);
                let sum = if accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, cp), *r)
                } else {
                    *r
                };
                _mm512_mask_storeu_ps(cp, mask, sum);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    _: usize,
    _: &[u32],
    _: &[u32],
    _: *mut f32,
    _: usize,
    _: usize,
    _: usize,
    _: bool,
) {
    unreachable!("the bf16 GEMM is x86_64-only; `available()` is false elsewhere")
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::uniform as values;

    /// A `B` packed once gives the per-call GEMM's results bit for bit, whichever operand is
    /// the one packed whole, across k blocks, on any thread count.
    #[test]
    #[cfg_attr(not(retort_cpu_avx512bf16), ignore = "this CPU has no AVX-512 BF16")]
    fn prepacked_b_equals_per_call_packing() {
        crate::testing::require(available(), "AVX-512 BF16");
        for &(m, n, k) in &[
            (5, 63, 3),
            (64, 96, 2 * KC + 33),
            (200, 33, 31),
            (33, 200, KC + 1),
            (1, 130, 70),
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
                let mut want = vec![MaybeUninit::new(f32::NAN); m * n];
                gemm_uninit(m, n, k, ar, br, &mut want, threads);
                let packed = PackedB::new(k, n, br, threads);
                assert_eq!(packed.dims(), (k, n));
                let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
                gemm_packed_b_uninit(m, ar, &packed, &mut got, threads);
                // SAFETY: initialised above and overwritten by the GEMMs.
                let (got, want): (Vec<f32>, Vec<f32>) = unsafe {
                    (
                        got.iter().map(|v| v.assume_init()).collect(),
                        want.iter().map(|v| v.assume_init()).collect(),
                    )
                };
                assert!(want.iter().all(|x| x.is_finite()), "every element written");
                assert_eq!(got, want, "m={m} n={n} k={k} threads={threads}");
            }
        }
    }
}
