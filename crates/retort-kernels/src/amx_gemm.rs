//! `C (m×n) = A (m×k) · B (k×n)` with bf16 products and f32 accumulation on Intel AMX tiles
//! (`tdpbf16ps`): the same contract as [`super::bf16_gemm::gemm`] (f32 in, f32 out, operands
//! rounded to bf16 while packed), on the matrix unit of Sapphire Rapids and later Xeons.
//!
//! Why: on the AMX Xeon host of `docs/performance-history.md` the AVX-512 `vdpbf16ps` GEMM reached only
//! 0.46–0.59× candle's f32 GEMM, while one `tdpbf16ps` multiplies a 16×32 by a 32×16 bf16 tile
//! (8,192 multiply-adds) per instruction. Neither candle nor `gemm` uses the tiles.
//!
//! Tiles: eight registers of 16 rows × 64 bytes. The micro-kernel holds a 32×32 block of C in
//! four (tmm0–3), two 16-row tiles of A (tmm4–5, 16 rows × 16 k-pairs) and two of B (tmm6–7,
//! 16 k-pairs × 16 columns, "VNNI" layout: one `u32` holds `B[2p][j]` and `B[2p+1][j]`).
//!
//! Blocking: k in blocks of `KC`; per block the operand with fewer 32-lines (rows of A or
//! columns of B) is packed whole, shared by the threads, and the other is streamed one 32-line
//! panel at a time, each thread taking a contiguous range of panels. Threads come from rayon's
//! pool (candle's), not fresh ones per call. A packed panel is a run of k-steps of 16 pairs,
//! each two contiguous 1 KB tiles (`Panel::index`), zero past every edge.
//!
//! Linux only grants the tile state on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), once per
//! process; [`crate::cpu::features`] asks. The `amx` switch (`RETORT_AMX=0` for the CLI) turns
//! the path off (to compare with `vdpbf16ps`).

// Tile instructions are inline assembly on raw pointers; each unsafe block states its invariant.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use super::bf16_gemm::{CPtr, MatRef, pair};

/// Lines (rows of A, columns of B) per panel: two tiles of 16.
const LINES: usize = 32;
/// k values per block (512 pairs): a packed 32-line panel is 64 KB.
const KC: usize = 1024;

/// Whether the bf16 GEMM runs on AMX tiles here: the CPU has them, Linux granted the tile
/// state, and the `amx` switch is on ([`crate::cpu`]).
pub fn available() -> bool {
    crate::cpu::amx()
}

/// `C (m×n, row-major) = A · B` into memory that need not be initialised (the contract of
/// [`super::bf16_gemm::gemm`], which calls this where AMX runs): every element of `c` is written (the
/// first k block stores C's tiles without reading them), so an output buffer skips its
/// zeroing (a 200 MB memset per LM head of a 1024-row batch).
pub fn gemm_uninit(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [MaybeUninit<f32>],
    threads: usize,
) {
    run_gemm(m, n, k, a, BSource::Strided(b), c, threads);
}

/// `B (k×n)` packed once, every k block, in the panel layout the GEMM streams: for a `B` that
/// does not change between calls (a frozen model's weight), so no call re-packs it. The
/// products are those of [`gemm_uninit`] on the same `B`, bit for bit.
#[derive(Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    /// Per k block of `KC`: the `⌈n/32⌉` panels of that block, one after the other.
    blocks: Vec<Vec<u32>>,
}

impl PackedB {
    /// Packs `b (k×n)` (any strides) on `threads` threads. Needs [`available`].
    pub fn new(k: usize, n: usize, b: MatRef, threads: usize) -> Self {
        assert!(available(), "AMX GEMM needs AMX-BF16 tiles");
        let np = n.div_ceil(LINES);
        let blocks = (0..k)
            .step_by(KC)
            .map(|pc| {
                let kc = KC.min(k - pc);
                let panel_len = panel_len_of(kc);
                let kp16 = panel_len / LINES;
                let mut out = vec![0u32; np * panel_len];
                let per = np.div_ceil(threads.clamp(1, 64)).max(1);
                rayon::scope(|s| {
                    for (t, chunk) in out.chunks_mut(per * panel_len).enumerate() {
                        s.spawn(move |_| {
                            for (i, dst) in chunk.chunks_mut(panel_len).enumerate() {
                                pack_b(b, n, (t * per + i) * LINES, pc, kc, kp16, dst);
                            }
                        });
                    }
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
}

/// `C (m×n) = A · B` for a pre-packed `B` ([`PackedB`]); `c` as in [`gemm_uninit`].
pub fn gemm_packed_b_uninit(
    m: usize,
    a: MatRef,
    b: &PackedB,
    c: &mut [MaybeUninit<f32>],
    threads: usize,
) {
    run_gemm(m, b.n, b.k, a, BSource::Packed(b), c, threads);
}

/// Where the GEMM gets B's panels: packed per call from a strided view, or pre-packed.
#[derive(Clone, Copy)]
enum BSource<'a> {
    Strided(MatRef<'a>),
    Packed(&'a PackedB),
}

/// `u32` pairs in one packed 32-line panel of `kc` k values.
fn panel_len_of(kc: usize) -> usize {
    LINES * kc.div_ceil(2).div_ceil(16) * 16
}

fn run_gemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: BSource,
    c: &mut [MaybeUninit<f32>],
    threads: usize,
) {
    assert!(available(), "AMX GEMM needs AMX-BF16 tiles");
    assert_eq!(c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(MaybeUninit::new(0.0));
        return;
    }
    let threads = threads.clamp(1, 64);
    let (mp, np) = (m.div_ceil(LINES), n.div_ceil(LINES));
    // Pack the operand with fewer panels whole; stream the other.
    let a_whole = mp <= np;
    let (whole_panels, stream_panels) = if a_whole { (mp, np) } else { (np, mp) };
    let cp = CPtr(c.as_mut_ptr().cast::<f32>());
    // One buffer for every k block (the first is the largest); the packers write all of it. A
    // pre-packed B that is the whole operand needs none.
    let packed_whole = matches!(b, BSource::Packed(_)) && !a_whole;
    let mut whole_buf = if packed_whole {
        Vec::new()
    } else {
        vec![0u32; whole_panels * panel_len_of(KC.min(k))]
    };
    for (blk, pc) in (0..k).step_by(KC).enumerate() {
        let kc = KC.min(k - pc);
        let panel_len = panel_len_of(kc);
        let kp16 = panel_len / LINES;
        let whole: &[u32] = match b {
            BSource::Packed(p) if !a_whole => &p.blocks[blk],
            _ => {
                let whole = &mut whole_buf[..whole_panels * panel_len];
                let pack_whole = |first: usize, out: &mut [u32]| {
                    for (i, dst) in out.chunks_mut(panel_len).enumerate() {
                        let p = first + i;
                        match b {
                            _ if a_whole => pack_a(a, m, p * LINES, pc, kc, kp16, dst),
                            BSource::Strided(b) => pack_b(b, n, p * LINES, pc, kc, kp16, dst),
                            BSource::Packed(_) => {
                                unreachable!("a pre-packed whole B is not packed")
                            }
                        }
                    }
                };
                let parts = threads.min(whole_panels);
                if parts <= 1 {
                    pack_whole(0, whole);
                } else {
                    let per = whole_panels.div_ceil(parts);
                    rayon::scope(|s| {
                        for (t, chunk) in whole.chunks_mut(per * panel_len).enumerate() {
                            s.spawn(move |_| pack_whole(t * per, chunk));
                        }
                    });
                }
                whole
            }
        };
        let accumulate = blk > 0;
        let run = move |range: std::ops::Range<usize>| {
            let mut panel = vec![0u32; panel_len];
            let mut edge = EdgeBlock([0.0; LINES * LINES]);
            let _tiles = Tiles::configure();
            for sp in range {
                let streamed: &[u32] = match b {
                    _ if !a_whole => {
                        pack_a(a, m, sp * LINES, pc, kc, kp16, &mut panel);
                        &panel
                    }
                    BSource::Strided(b) => {
                        pack_b(b, n, sp * LINES, pc, kc, kp16, &mut panel);
                        &panel
                    }
                    BSource::Packed(p) => &p.blocks[blk][sp * panel_len..][..panel_len],
                };
                for wp in 0..whole_panels {
                    let w = &whole[wp * panel_len..][..panel_len];
                    let (ip, jp, ap, bp) = if a_whole {
                        (wp, sp, w, streamed)
                    } else {
                        (sp, wp, streamed, w)
                    };
                    let (i0, j0) = (ip * LINES, jp * LINES);
                    let (rows, cols) = (LINES.min(m - i0), LINES.min(n - j0));
                    // SAFETY: tiles are configured in this thread; the panels hold
                    // LINES·kp16 values each; the C block (i0.., j0..) of rows × cols lies
                    // inside C, and no other thread writes it (threads own disjoint panels).
                    unsafe {
                        micro(
                            kp16,
                            ap.as_ptr(),
                            bp.as_ptr(),
                            cp.add(i0 * n + j0).0,
                            n,
                            rows,
                            cols,
                            accumulate,
                            &mut edge,
                        )
                    };
                }
            }
        };
        let parts = threads.min(stream_panels);
        if parts <= 1 {
            run(0..stream_panels);
        } else {
            let per = stream_panels.div_ceil(parts);
            rayon::scope(|s| {
                for start in (0..stream_panels).step_by(per) {
                    let end = (start + per).min(stream_panels);
                    s.spawn(move |_| run(start..end));
                }
            });
        }
    }
}

/// Which operand a panel holds, and so the layout of its tiles.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Panel {
    /// Rows of A: each tile is 16 rows × 16 k-pairs.
    A,
    /// Columns of B: each tile is 16 k-pairs × 16 columns.
    B,
}

impl Panel {
    /// Where the k-pair `p` of line `l` (a row of A, a column of B) goes in a panel: k-steps of
    /// 16 pairs, each two contiguous 1 KB tiles (lines 0–15, then 16–31), so the micro-kernel
    /// reads every tile as one contiguous block (row stride 64 bytes; measured +15 % on the
    /// tile loads against a row stride of the whole panel).
    #[inline(always)]
    fn index(self, l: usize, p: usize) -> usize {
        let (step, pp, tile, r) = (p / 16, p % 16, l / 16, l % 16);
        step * 512
            + tile * 256
            + match self {
                Panel::A => r * 16 + pp,
                Panel::B => pp * 16 + r,
            }
    }
}

/// Packs rows `i0..i0+32` of A (zero past `m`) at k values `pc..pc+kc` (zero past `kc`): the
/// pair `(A[i][2p], A[i][2p+1])` at [`Panel::index`].
fn pack_a(a: MatRef, m: usize, i0: usize, pc: usize, kc: usize, kp16: usize, out: &mut [u32]) {
    let valid = LINES.min(m - i0);
    let base = a.offset + i0 * a.rs + pc * a.cs;
    pack_lines(a.data, base, a.rs, a.cs, valid, kc, kp16, out, Panel::A);
}

/// Packs columns `j0..j0+32` of B (zero past `n`) at k values `pc..pc+kc`: the pair
/// `(B[2p][j], B[2p+1][j])` at [`Panel::index`].
fn pack_b(b: MatRef, n: usize, j0: usize, pc: usize, kc: usize, kp16: usize, out: &mut [u32]) {
    let valid = LINES.min(n - j0);
    let base = b.offset + pc * b.rs + j0 * b.cs;
    pack_lines(b.data, base, b.cs, b.rs, valid, kc, kp16, out, Panel::B);
}

/// The shared packer: line `l < valid` at k value `q < kc` is `data[base + l·ls + q·ks]`; the
/// pair (2p, 2p+1) of line l goes to `out[panel.index(l, p)]`; every other entry of the
/// `32 × kp16` panel is zero. Works in blocks of 16 lines × 16 pairs: inside the matrix and with one of
/// the strides 1, a block is converted with AVX-512 BF16 (`vcvtne2ps2bf16`, round to nearest
/// even as [`super::bf16_gemm::bf16_bits`]) and transposed in registers where the output runs
/// the other way; edge blocks and other strides go element by element.
#[allow(clippy::too_many_arguments)] // one place, named by the two callers above
fn pack_lines(
    data: &[f32],
    base: usize,
    ls: usize,
    ks: usize,
    valid: usize,
    kc: usize,
    kp16: usize,
    out: &mut [u32],
    panel: Panel,
) {
    assert!(out.len() >= LINES * kp16);
    for l0 in (0..LINES).step_by(16) {
        for p0 in (0..kp16).step_by(16) {
            let inside = l0 + 16 <= valid && 2 * p0 + 32 <= kc;
            // The last element the block reads, for the bounds check of the vector path.
            let last = base + (l0 + 15) * ls + (2 * p0 + 31) * ks;
            if inside && (ks == 1 || ls == 1) && last < data.len() {
                // SAFETY: every read is at most `last`, inside `data`; every write is inside
                // `out` (l < 32, p < kp16); `available()` checked AVX-512 BF16.
                unsafe { pack_block_simd(data, base, ls, ks, l0, p0, out, panel) };
                continue;
            }
            for l in l0..l0 + 16 {
                for p in p0..p0 + 16 {
                    let at = |q: usize| {
                        if l < valid && q < kc {
                            data[base + l * ls + q * ks]
                        } else {
                            0.0
                        }
                    };
                    out[panel.index(l, p)] = pair(at(2 * p), at(2 * p + 1));
                }
            }
        }
    }
}

/// One 16 × 16 block of [`pack_lines`] on AVX-512 BF16.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16; `ks == 1` or `ls == 1`; the block's reads
/// (lines `l0..l0+16`, k values `2·p0..2·p0+32`) and writes lie inside `data` and `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_block_simd(
    data: &[f32],
    base: usize,
    ls: usize,
    ks: usize,
    l0: usize,
    p0: usize,
    out: &mut [u32],
    panel: Panel,
) {
    use std::arch::x86_64::*;
    let src = data.as_ptr();
    let dst = out.as_mut_ptr();
    let mut v = [_mm512_setzero_si512(); 16];
    // SAFETY (whole block): the caller's bounds; loads and stores are unaligned.
    unsafe {
        // `by_line`: v[i] holds the 16 pairs of line l0 + i; else v[i] holds pair p0 + i of the
        // 16 lines.
        let by_line = ks == 1;
        if by_line {
            for (i, vi) in v.iter_mut().enumerate() {
                let x = src.add(base + (l0 + i) * ls + 2 * p0);
                let bf = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x.add(16)), _mm512_loadu_ps(x));
                *vi = std::mem::transmute::<__m512bh, __m512i>(bf);
            }
        } else {
            for (i, vi) in v.iter_mut().enumerate() {
                let q = 2 * (p0 + i);
                let lo = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.add(base + l0 + q * ks)));
                let hi = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.add(base + l0 + (q + 1) * ks)));
                let lo = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(lo));
                let hi = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(hi));
                *vi = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
            }
        }
        // A panels hold a line's 16 pairs contiguous, B panels a pair's 16 lines.
        let want_by_line = panel == Panel::A;
        if by_line != want_by_line {
            v = transpose16(v);
        }
        for (i, vi) in v.iter().enumerate() {
            let at = if want_by_line {
                panel.index(l0 + i, p0)
            } else {
                panel.index(l0, p0 + i)
            };
            _mm512_storeu_si512(dst.add(at) as *mut __m512i, *vi);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_block_simd(
    _: &[f32],
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: &mut [u32],
    _: Panel,
) {
    unreachable!("AMX is x86_64-only; `available()` is false elsewhere")
}

/// Transposes a 16 × 16 matrix of `u32` held as 16 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) fn transpose16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // Within each 128-bit lane L: t pairs rows, u then holds column 4L + c of rows 4i..4i+4
    // in u[4i + c].
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // Gather lane L of u[c], u[4 + c], u[8 + c], u[12 + c] into column 4L + c.
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let s1 = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
        let s2 = _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]);
        let s3 = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
        let s4 = _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(s1, s3);
        out[4 + c] = _mm512_shuffle_i32x4::<0xDD>(s1, s3);
        out[8 + c] = _mm512_shuffle_i32x4::<0x88>(s2, s4);
        out[12 + c] = _mm512_shuffle_i32x4::<0xDD>(s2, s4);
    }
    out
}

/// The tile configuration of this thread while alive: palette 1, tiles 0–7 of 16 rows × 64
/// bytes. Dropping it releases the tile state (so the thread's context switches stay cheap).
struct Tiles;

#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl Tiles {
    fn configure() -> Tiles {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        // SAFETY: `available()` was true (the caller is `gemm`), so the CPU has AMX and Linux
        // granted the tile state; the config is 64 bytes, 64-aligned, with valid sizes.
        unsafe { tile_config(&cfg) };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `configure` in this thread.
        unsafe { tile_release() };
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn tile_config(cfg: &TileConfig) {
    // SAFETY: see `Tiles::configure`.
    unsafe {
        std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg as *const TileConfig, options(nostack))
    };
}

#[cfg(target_arch = "x86_64")]
unsafe fn tile_release() {
    // SAFETY: see `Drop for Tiles`.
    unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_config(_: &TileConfig) {
    unreachable!("AMX is x86_64-only; `available()` is false elsewhere")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_release() {}

/// A 32×32 block of C for the tiles at C's edges; one per thread, reused (zeroing a fresh one
/// in every micro-kernel call showed as 4.7 % of a KD step's `perf` samples).
#[repr(C, align(64))]
struct EdgeBlock([f32; LINES * LINES]);

/// `C[0..rows, 0..cols] (+)= Apanel · Bpanel` over `kp16` k-pairs (a multiple of 16); C has
/// row stride `ldc`; with `accumulate` false, C's old values are overwritten.
///
/// # Safety
/// Tiles are configured in this thread ([`Tiles`]); `a` and `b` hold `32·kp16` values in the
/// panel layouts of [`pack_a`] / [`pack_b`]; the `rows × cols` block at `c` lies inside C.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    kp16: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
    tmp: &mut EdgeBlock,
) {
    use std::arch::asm;
    let full = rows == LINES && cols == LINES;
    // Where the tiles of C are loaded from and stored to: C itself, or a 32×32 copy at edges
    // (whose entries outside the block are never copied back).
    let (cbase, cstride) = if full {
        (c, ldc)
    } else {
        if accumulate {
            for i in 0..rows {
                for j in 0..cols {
                    // SAFETY: (i, j) is inside the block.
                    tmp.0[i * LINES + j] = unsafe { *c.add(i * ldc + j) };
                }
            }
        }
        (tmp.0.as_mut_ptr(), LINES)
    };
    let cs = cstride * 4; // bytes
    // SAFETY (whole block): every tile access reads or writes 16 rows of 64 bytes at
    // `base + r·stride`, inside the panels (1 KB tiles, row stride 64 bytes) or the C block.
    unsafe {
        let (c00, c01, c10, c11) = (
            cbase,
            cbase.add(16),
            cbase.add(16 * cstride),
            cbase.add(16 * cstride + 16),
        );
        if accumulate {
            asm!(
                "tileloadd tmm0, [{c00} + {cs}*1]",
                "tileloadd tmm1, [{c01} + {cs}*1]",
                "tileloadd tmm2, [{c10} + {cs}*1]",
                "tileloadd tmm3, [{c11} + {cs}*1]",
                c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                cs = in(reg) cs, options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for p in (0..kp16).step_by(16) {
            asm!(
                // Loads interleaved with the products that need them, so each product starts
                // as soon as its operands are in.
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(p * LINES),
                a1 = in(reg) a.add(p * LINES + 256),
                sa = in(reg) 64usize,
                b0 = in(reg) b.add(p * LINES),
                b1 = in(reg) b.add(p * LINES + 256),
                sb = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c00} + {cs}*1], tmm0",
            "tilestored [{c01} + {cs}*1], tmm1",
            "tilestored [{c10} + {cs}*1], tmm2",
            "tilestored [{c11} + {cs}*1], tmm3",
            c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
            cs = in(reg) cs, options(nostack),
        );
    }
    if !full {
        for i in 0..rows {
            for j in 0..cols {
                // SAFETY: (i, j) is inside the block.
                unsafe { *c.add(i * ldc + j) = tmp.0[i * LINES + j] };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    _: usize,
    _: *const u32,
    _: *const u32,
    _: *mut f32,
    _: usize,
    _: usize,
    _: usize,
    _: bool,
    _: &mut EdgeBlock,
) {
    unreachable!("AMX is x86_64-only; `available()` is false elsewhere")
}
