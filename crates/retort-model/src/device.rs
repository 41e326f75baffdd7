//! The one place a compute device is chosen: `--device cpu | cuda[:N] | auto`, resolved once by
//! the CLI and passed down to everything that loads a model or builds a tensor.
//!
//! retort's own CPU kernels (`retort-kernels`) are chosen by dispatch on the tensor's device, with
//! candle's generic ops on any other device. Paths that only run on the CPU (training: the
//! in-place AdamW and the fused losses; KD from a logit cache) refuse another device with an error
//! that says so ([`require_cpu`]). This build carries no CUDA kernels (candle's `cuda` feature
//! needs the CUDA toolkit at build time), so `cuda` answers with an error naming that.

use candle_core::Device;

use crate::error::{Error, Result};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
    /// CUDA GPU 0 where this build and machine have one, else the CPU.
    Auto,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("unknown device `{s}` (expected cpu, cuda, cuda:N or auto)");
        match s {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl DeviceChoice {
    /// The device itself.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
            Self::Cuda(n) => Device::new_cuda(n).map_err(|e| {
                Error::invalid(
                    format!("device cuda:{n}: {e}"),
                    "this build of retort runs on the CPU only (--device cpu); a CUDA build needs \
                     candle's `cuda` feature and the CUDA toolkit",
                )
            }),
        }
    }
}

/// Refuse `device` for a path that only runs on the CPU (`what` names it).
pub fn require_cpu(device: &Device, what: &str) -> Result<()> {
    if device.is_cpu() {
        Ok(())
    } else {
        Err(Error::invalid(
            format!("{what} runs on the CPU only for now, not on {device:?}"),
            "use --device cpu",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_resolve_or_refuse_with_a_hint() {
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
        }
        assert!(DeviceChoice::Cpu.resolve().unwrap().is_cpu());
        assert!(DeviceChoice::Auto.resolve().is_ok());
        // No CUDA in this build: a clear error, not a panic or a silent CPU.
        let e = DeviceChoice::Cuda(0).resolve().unwrap_err().to_string();
        assert!(e.contains("cuda:0") && e.contains("--device cpu"), "{e}");
        assert!(require_cpu(&Device::Cpu, "training").is_ok());
    }
}
