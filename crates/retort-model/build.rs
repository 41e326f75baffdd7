//! The build host's CPU features as `retort_cpu_<feature>` cfgs, from `retort-kernels`'s build
//! script (DEP_RETORT_KERNELS_CPU), so this crate's tests of bf16 products and AMX packing are
//! reported as ignored on a CPU without them, as the kernels' own tests are.

fn main() {
    println!("cargo::rerun-if-env-changed=DEP_RETORT_KERNELS_CPU");
    let present = std::env::var("DEP_RETORT_KERNELS_CPU").unwrap_or_default();
    for name in ["avx512f", "avx512bw", "avx512bf16", "avx512vnni", "amx"] {
        println!("cargo::rustc-check-cfg=cfg(retort_cpu_{name})");
        if present.split(',').any(|p| p == name) {
            println!("cargo::rustc-cfg=retort_cpu_{name}");
        }
    }
}
