//! The kernels on this CPU, without a model: candle's f32 GEMM roofline and the training step's
//! shapes against the bf16 GEMM (AMX or AVX-512 BF16), `exp` against libm, and the LM head's
//! product at decoding batch sizes per weight format (f32, f16, retort's Q8_0 kernel).
//!
//!     RAYON_NUM_THREADS=2 cargo bench -p retort-kernels --bench kernels [-- gemm|exp|linear]
//!
//! Reports medians of several runs. Not a test: nothing here asserts a speed. `RETORT_AMX=0` and
//! `RETORT_Q8_KERNEL=0` turn retort's kernels off, as for the CLI.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark binary

use std::time::Instant;

use candle_core::{Device, Tensor};
use retort_kernels::cpu;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let only = |name: &str| {
        args.iter()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .all(|a| name.contains(a.as_str()))
    };
    cpu::set_switches(cpu::Switches::from_env().unwrap()).unwrap();
    retort_kernels::runtime::configure_allocator(retort_kernels::runtime::AllocatorMode::Retain);
    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    println!(
        "retort kernels bench | threads {threads} | CPU lacks {:?} | switches {:?}",
        cpu::features().missing(),
        cpu::switches()
    );
    let runs = 5;

    if only("gemm") {
        let n = 1024;
        let a = Tensor::randn(0f32, 1., (n, n), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., (n, n), &dev).unwrap();
        let _ = a.matmul(&b).unwrap();
        let times: Vec<f64> = (0..runs)
            .map(|_| {
                let t0 = Instant::now();
                std::hint::black_box(a.matmul(&b).unwrap());
                t0.elapsed().as_secs_f64()
            })
            .collect();
        println!(
            "gemm f32 1024³: {:.1} GFLOP/s",
            2.0 * (n as f64).powi(3) / median(times) / 1e9
        );
        // The training step's shapes (10-layer student, 1024 rows): forward x·Wᵀ, backward
        // g·W and gᵀ·x, and the LM head; candle's f32 GEMM against the bf16 kernel.
        let shapes: [(&str, usize, usize, usize, bool, bool); 7] = [
            ("1024³", 1024, 1024, 1024, false, false),
            ("x·Wᵀ  1024×576·576×1536", 1024, 1536, 576, false, true),
            ("g·W   1024×1536·1536×576", 1024, 576, 1536, false, false),
            ("gᵀ·x  1536×1024·1024×576", 1536, 576, 1024, true, false),
            ("head  1024×576·576×49152", 1024, 49152, 576, false, true),
            ("dh    1024×49152·49152×576", 1024, 576, 49152, false, false),
            ("dE    49152×1024·1024×576", 49152, 576, 1024, true, false),
        ];
        let bf16 = retort_kernels::bf16_gemm::available();
        for (name, m, n, k, a_t, b_t) in shapes {
            // a_t / b_t: the operand is a transposed view, as in a linear layer's passes.
            let a = if a_t {
                Tensor::randn(0f32, 1., (k, m), &dev).unwrap().t().unwrap()
            } else {
                Tensor::randn(0f32, 1., (m, k), &dev).unwrap()
            };
            let b = if b_t {
                Tensor::randn(0f32, 1., (n, k), &dev).unwrap().t().unwrap()
            } else {
                Tensor::randn(0f32, 1., (k, n), &dev).unwrap()
            };
            let flop = 2.0 * (m * n * k) as f64;
            let reps = if flop > 2e10 { 3 } else { runs };
            let time = |f: &dyn Fn() -> Tensor| {
                f();
                median(
                    (0..reps)
                        .map(|_| {
                            let t0 = Instant::now();
                            std::hint::black_box(f());
                            t0.elapsed().as_secs_f64()
                        })
                        .collect(),
                )
            };
            let f32_s = time(&|| a.matmul(&b).unwrap());
            let line = format!("gemm {name}: f32 {:.1} GFLOP/s", flop / f32_s / 1e9);
            if bf16 {
                let bf_s = time(&|| retort_kernels::matmul_bf16(&a, &b).unwrap());
                println!(
                    "{line} | bf16 {:.1} GFLOP/s ({:.2}x)",
                    flop / bf_s / 1e9,
                    f32_s / bf_s
                );
            } else {
                println!("{line} | bf16: no AVX-512 BF16 on this CPU");
            }
        }
    }

    if only("exp") {
        // One loss row's softmax statistics over the vocabulary, 1,000 rows: libm vs ours.
        use retort_kernels::exp;
        let row: Vec<f32> = (0..49152)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let rows = 1000;
        let time = |f: &dyn Fn() -> f32| {
            median(
                (0..5)
                    .map(|_| {
                        let t0 = Instant::now();
                        std::hint::black_box(f());
                        t0.elapsed().as_secs_f64()
                    })
                    .collect(),
            )
        };
        let libm = time(&|| {
            (0..rows)
                .map(|_| {
                    let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    row.iter().map(|&v| (v - m).exp()).sum::<f32>()
                })
                .sum()
        });
        let ours = time(&|| {
            (0..rows)
                .map(|_| exp::sum_exp(&row, 1.0, exp::max(&row)))
                .sum()
        });
        println!(
            "max + sum of exp, {rows} rows of 49,152 (one thread): libm {:.1} ms, ours {:.1} ms ({:.1}x)",
            libm * 1e3,
            ours * 1e3,
            libm / ours
        );
    }

    if only("linear") {
        // The LM head's shape, (V, C) = (49152, 576), at decoding batch sizes: the weight held
        // in f32 (x·Wᵀ and W·xᵀ), in f16 (candle's f16 matmul), and in Q8_0 (retort's kernel):
        // which format decoding should use.
        let w = Tensor::randn(0f32, 0.02, (49152, 576), &dev).unwrap();
        let w16 = w.to_dtype(candle_core::DType::F16).unwrap();
        let q8 = retort_kernels::q8_matmul::available().then(|| {
            let q = candle_core::quantized::QTensor::quantize(
                &w,
                candle_core::quantized::GgmlDType::Q8_0,
            )
            .unwrap();
            retort_kernels::q8_matmul::PackedQ8_0::new(&q).unwrap()
        });
        for rows in [1usize, 8, 32] {
            let x = Tensor::randn(0f32, 1., (rows, 576), &dev).unwrap();
            let time = |f: &dyn Fn() -> Tensor| {
                f();
                median(
                    (0..9)
                        .map(|_| {
                            let t0 = Instant::now();
                            std::hint::black_box(f());
                            t0.elapsed().as_secs_f64()
                        })
                        .collect(),
                )
            };
            let a = time(&|| x.matmul(&w.t().unwrap()).unwrap());
            let b = time(&|| {
                w.matmul(&x.t().unwrap())
                    .unwrap()
                    .t()
                    .unwrap()
                    .contiguous()
                    .unwrap()
            });
            let x16 = x.to_dtype(candle_core::DType::F16).unwrap();
            let c = time(&|| x16.matmul(&w16.t().unwrap()).unwrap());
            let q8 = q8.as_ref().map_or("not on this CPU".to_string(), |p| {
                let d = time(&|| x.apply_op1_no_bwd(p).unwrap());
                format!("{:.2} ms", d * 1e3)
            });
            println!(
                "lm_head rows {rows}: f32 x·Wᵀ {:.2} ms, f32 W·xᵀ {:.2} ms, f16 x·Wᵀ {:.2} ms, q8_0 {q8}",
                a * 1e3,
                b * 1e3,
                c * 1e3
            );
        }
    }
}
