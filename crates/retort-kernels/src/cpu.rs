//! What this CPU runs, detected once per process, and the switches that turn retort's own kernels
//! off to compare them with candle's (`RETORT_AMX=0`, `RETORT_Q8_KERNEL=0`).
//!
//! The switches are settings, not something a library looks up: binaries (the CLI, the benches)
//! read them once with [`Switches::from_env`] and hand them to [`set_switches`] before any tensor
//! work. Without that call every kernel the CPU supports is on.

use std::sync::OnceLock;

pub use crate::detect::Features;

/// The CPU's features (asked once; asking for AMX also requests the tile state from Linux).
pub fn features() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(crate::detect::detect)
}

/// Which of retort's own kernels may run where the CPU has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switches {
    /// The bf16 GEMM on AMX tiles (else AVX-512 BF16, else f32).
    pub amx: bool,
    /// retort's Q8_0 decoding kernel (else candle's quantized matmul on padded weights).
    pub q8_kernel: bool,
}

impl Default for Switches {
    fn default() -> Self {
        Self {
            amx: true,
            q8_kernel: true,
        }
    }
}

impl Switches {
    /// `RETORT_AMX` and `RETORT_Q8_KERNEL`: unset or `1` = on, `0` = off; anything else is an
    /// error naming the variable. The one place these variables are read.
    pub fn from_env() -> Result<Self, String> {
        fn switch(var: &str) -> Result<bool, String> {
            match std::env::var(var) {
                Err(std::env::VarError::NotPresent) => Ok(true),
                Ok(v) if v == "1" => Ok(true),
                Ok(v) if v == "0" => Ok(false),
                Ok(v) => Err(format!(
                    "{var}={v:?}: expected 0 (off) or 1 (on); unset it for the default (on)"
                )),
                Err(e) => Err(format!("{var}: {e}")),
            }
        }
        Ok(Self {
            amx: switch("RETORT_AMX")?,
            q8_kernel: switch("RETORT_Q8_KERNEL")?,
        })
    }
}

static SWITCHES: OnceLock<Switches> = OnceLock::new();

/// Sets the switches for this process. Call before any tensor work: once a kernel has consulted
/// them they are fixed, and setting different ones is an error.
pub fn set_switches(s: Switches) -> Result<(), String> {
    let now = *SWITCHES.get_or_init(|| s);
    if now == s {
        Ok(())
    } else {
        Err(format!(
            "kernel switches already fixed at {now:?}; set them before any tensor work"
        ))
    }
}

/// The switches in force ([`Switches::default`] unless [`set_switches`] came first).
pub fn switches() -> Switches {
    *SWITCHES.get_or_init(Switches::default)
}

/// Whether the bf16 GEMM runs on AMX tiles here.
pub fn amx() -> bool {
    switches().amx && features().amx
}

/// Whether retort's Q8_0 kernel runs here.
pub fn q8_kernel() -> bool {
    let f = features();
    switches().q8_kernel && f.avx512f && f.avx512bw && f.avx512vnni
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_agree_with_std_detection() {
        let f = features();
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(f.avx512f, std::is_x86_feature_detected!("avx512f"));
            assert_eq!(
                f.avx512vnni,
                f.avx512f && std::is_x86_feature_detected!("avx512vnni")
            );
        }
        // The build host is this host when tests are built and run in one go (CI).
        assert_eq!(f.amx, cfg!(retort_cpu_amx));
        assert_eq!(f.avx512bf16, cfg!(retort_cpu_avx512bf16));
        assert_eq!(f.avx512vnni, cfg!(retort_cpu_avx512vnni));
        assert!(f.missing().iter().all(|m| !m.is_empty()));
    }
}
