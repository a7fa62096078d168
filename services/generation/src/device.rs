//! Device and dtype selection: `--device auto|cpu|cuda[:N]` and `--dtype
//! auto|f32|bf16|f16|int8|int4`, validated against what the machine has.

use std::str::FromStr;

use tch::{Device, Kind};

use crate::model::Precision;

/// A device request as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 when libtorch sees a GPU, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("device {other:?} is not auto, cpu, cuda or cuda:N")),
        }
    }
}

impl DeviceSpec {
    /// The libtorch device. Errors when CUDA is asked for and libtorch sees
    /// no such GPU.
    pub fn resolve(self) -> Result<Device, String> {
        match self {
            Self::Auto => Ok(Device::cuda_if_available()),
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                let count = tch::Cuda::device_count();
                if (n as i64) < count {
                    Ok(Device::Cuda(n))
                } else {
                    Err(format!(
                        "--device cuda:{n} asked for, but libtorch sees {count} CUDA device(s); use --device cpu or auto"
                    ))
                }
            }
        }
    }
}

/// Weight and activation dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeSpec {
    /// bf16 on CUDA; int4 on the CPU, the fastest there at an accepted
    /// quality (BENCHMARKS.md, "Generation against llama.cpp": 1.33× the
    /// decode speed of llama.cpp's Q4_K_M on the same GGUF; the parity
    /// bound of `tests/parity.rs`). `f32` gives exact parity with the f32
    /// reference.
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16: half the weight bytes to stream per token.
    Bf16,
    /// IEEE half; CUDA only.
    F16,
    /// Weight-only int8 projections, bf16 activations; CPU only. The
    /// fastest single stream on a memory-bound CPU; not bit-exact.
    Int8,
    /// Weight-only int4 projections (groups of 32) and an int8 LM head,
    /// bf16 activations; CPU only. About a sixth of f32's weight bytes per
    /// token.
    Int4,
}

impl FromStr for DtypeSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            "int8" => Ok(Self::Int8),
            "int4" => Ok(Self::Int4),
            other => Err(format!(
                "dtype {other:?} is not auto, f32, bf16, f16, int8 or int4"
            )),
        }
    }
}

impl DtypeSpec {
    /// The precision on `device`. Errors for f16 on the CPU and int8 on CUDA.
    pub fn resolve(self, device: Device) -> Result<Precision, String> {
        match (self, device) {
            (Self::F32, _) => Ok(Kind::Float.into()),
            (Self::Auto, Device::Cpu) | (Self::Int4, Device::Cpu) => Ok(Precision::INT4),
            (Self::Auto, _) | (Self::Bf16, _) => Ok(Kind::BFloat16.into()),
            (Self::F16, Device::Cpu) => {
                Err("--dtype f16 is for CUDA; use f32, bf16, int8 or int4 on the CPU".into())
            }
            (Self::F16, _) => Ok(Kind::Half.into()),
            (Self::Int8, Device::Cpu) => Ok(Precision::INT8),
            (Self::Int8, _) => Err("--dtype int8 is for the CPU; use bf16 or f16 on CUDA".into()),
            (Self::Int4, _) => Err("--dtype int4 is for the CPU; use bf16 or f16 on CUDA".into()),
        }
    }
}

/// `cpu`, `cuda:0`, … as reported by ListModels.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        _ => "cpu".into(),
    }
}

/// `f32`, `bf16`, `f16` as reported by ListModels.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        _ => "f32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert_eq!(DtypeSpec::Auto.resolve(Device::Cpu), Ok(Precision::INT4));
        assert_eq!(DtypeSpec::F32.resolve(Device::Cpu), Ok(Kind::Float.into()));
        assert!(DtypeSpec::F16.resolve(Device::Cpu).is_err());
        assert_eq!(
            DtypeSpec::Auto.resolve(Device::Cuda(0)),
            Ok(Kind::BFloat16.into())
        );
        assert_eq!(DtypeSpec::Int8.resolve(Device::Cpu), Ok(Precision::INT8));
        assert_eq!("int4".parse::<DtypeSpec>(), Ok(DtypeSpec::Int4));
        assert_eq!(DtypeSpec::Int4.resolve(Device::Cpu), Ok(Precision::INT4));
        assert!(DtypeSpec::Int4.resolve(Device::Cuda(0)).is_err());
    }
}
