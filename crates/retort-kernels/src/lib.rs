//! retort's CPU kernels: the ones candle 0.11 does not have on the CPU, each with a measured reason (see
//! `docs/performance-history.md`) and tests against the plain composition it replaces (values and
//! gradients).
//!
//! - [`bf16_gemm`]: f32-in/f32-out GEMM with bf16 products (candle widens bf16 to f32): the
//!   contract and its portable reference; the kernels are [`vdp_gemm`] (AVX-512 BF16) and
//!   [`amx_gemm`] (AMX tiles, chosen where the CPU has them).
//!   [`matmul`]: that GEMM as a differentiable op, and the precision switch; [`frozen_bf16`]:
//!   a frozen weight packed once for it.
//! - [`mod@rms_norm`], [`mod@rope`], [`mod@swiglu`], [`softmax`]: the trainable model's elementwise and
//!   row-wise pieces as single ops with explicit backward; candle's fused versions carry no
//!   gradient, and the compositions allocate a tensor per step.
//! - [`q8_matmul`]: Q8_0 weights × f32 activations for decoding on AVX-512 VNNI, activations
//!   quantized in blocks of 32; candle's kernel needs input widths that are multiples of 256.
//! - [`mod@decode_attention`]: attention for one new position per row (generation), reading the
//!   key/value cache in place and skipping each row's left padding; no backward.
//! - [`cpu`]: the CPU's features, detected once, and the switches that turn these kernels off
//!   (set by binaries, never read from the environment by a library); [`runtime`]: the
//!   process settings they run under (allocator, environment at start).
//!
//! Every kernel has a portable path or reference that its tests run on any machine; a test of an
//! instruction set this CPU lacks is reported as ignored with the reason (see `build.rs`).
//! This is the one crate of retort with `unsafe` code (intrinsics, inline assembly, raw
//! pointers shared by threads); each block states its invariant.

pub mod amx_gemm;
pub mod bf16_gemm;
pub mod cpu;
pub mod decode_attention;
mod detect;
pub mod exp;
pub mod frozen_bf16;
pub mod matmul;
mod par;
pub mod q8_matmul;
pub mod rms_norm;
pub mod rope;
pub mod runtime;
pub mod softmax;
pub mod swiglu;
#[cfg(test)]
mod testing;
pub mod vdp_gemm;

pub use decode_attention::decode_attention;
pub use matmul::{MatmulPrecision, matmul_bf16};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use softmax::masked_softmax;
pub use swiglu::swiglu;
