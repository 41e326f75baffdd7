//! Marks the tests this build host's CPU cannot run: each feature it has becomes a
//! `retort_cpu_<feature>` cfg, and tests of a kernel use
//! `#[cfg_attr(not(retort_cpu_amx), ignore = "this CPU has no AMX tiles")]`, so `cargo test`
//! reports them as ignored (with the reason) instead of counting an early return as a pass. A
//! test that runs checks the feature again and fails loudly if the binary moved to a CPU without it.

#[allow(dead_code)] // `Features::missing` is for the library
#[path = "src/detect.rs"]
mod detect;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/detect.rs");
    let f = detect::detect();
    let mut present = Vec::new();
    for (name, has) in [
        ("avx512f", f.avx512f),
        ("avx512bw", f.avx512bw),
        ("avx512bf16", f.avx512bf16),
        ("avx512vnni", f.avx512vnni),
        ("amx", f.amx),
    ] {
        println!("cargo::rustc-check-cfg=cfg(retort_cpu_{name})");
        if has {
            println!("cargo::rustc-cfg=retort_cpu_{name}");
            present.push(name);
        }
    }
    // For dependents' build scripts (`retort-model/build.rs`): DEP_RETORT_KERNELS_CPU.
    println!("cargo::metadata=cpu={}", present.join(","));
}
