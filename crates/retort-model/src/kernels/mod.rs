//! Kernels candle 0.11 does not have on the CPU, each with a measured reason (see
//! `docs/performance.md`) and tests against the plain composition.
//!
//! - [`bf16_gemm`]: f32-in/f32-out GEMM with bf16 products (AVX-512 BF16), the CPU's fastest
//!   matmul here; candle widens bf16 to f32.
//! - [`matmul`]: that GEMM as a differentiable candle op, and the precision switch.

pub mod bf16_gemm;
pub mod matmul;

pub use matmul::{MatmulPrecision, matmul_bf16};
