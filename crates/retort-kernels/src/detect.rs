//! CPU-feature detection, shared with `build.rs` (which turns the build host's features into the
//! `retort_cpu_*` cfgs that mark tests this CPU cannot run as ignored, so a skip shows in the test
//! summary instead of passing silently).

/// The instruction sets retort's own kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// AVX-512 Foundation: `exp` and the packers.
    pub avx512f: bool,
    /// AVX-512 byte/word: the Q8_0 activation quantizer.
    pub avx512bw: bool,
    /// AVX-512 BF16 (`vdpbf16ps`): the bf16 GEMM without AMX.
    pub avx512bf16: bool,
    /// AVX-512 VNNI (`vpdpbusd`): the Q8_0 decoding kernel.
    pub avx512vnni: bool,
    /// AMX-TILE and AMX-BF16, with the tile state granted by Linux (and AVX-512 BF16 for the
    /// packers): the bf16 GEMM on tiles.
    pub amx: bool,
}

impl Features {
    /// The names of the features this CPU lacks, for messages.
    pub fn missing(&self) -> Vec<&'static str> {
        [
            ("avx512f", self.avx512f),
            ("avx512bw", self.avx512bw),
            ("avx512bf16", self.avx512bf16),
            ("avx512vnni", self.avx512vnni),
            ("amx", self.amx),
        ]
        .into_iter()
        .filter(|(_, has)| !has)
        .map(|(name, _)| name)
        .collect()
    }
}

/// Asks the CPU (and, for AMX, Linux) once; callers cache the answer.
#[cfg(target_arch = "x86_64")]
pub fn detect() -> Features {
    let avx512f = std::is_x86_feature_detected!("avx512f");
    let avx512bf16 = avx512f && std::is_x86_feature_detected!("avx512bf16");
    Features {
        avx512f,
        avx512bw: avx512f && std::is_x86_feature_detected!("avx512bw"),
        avx512bf16,
        avx512vnni: avx512f && std::is_x86_feature_detected!("avx512vnni"),
        amx: avx512bf16 && amx_tiles(),
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub fn detect() -> Features {
    Features::default()
}

/// AMX-TILE and AMX-BF16 in CPUID, and the tile state granted (Linux grants it only on request,
/// once per process: `arch_prctl(ARCH_REQ_XCOMP_PERM)`).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_tiles() -> bool {
    // CPUID.(EAX=7, ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; on failure it returns -1.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn amx_tiles() -> bool {
    false
}
