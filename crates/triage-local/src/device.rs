//! Device choice: made once per process from a string such as `cpu` or `cuda:1`.

use crate::error::{LocalError, Result};
use candle_core::Device;

/// Where models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = LocalError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "metal" => Ok(Self::Metal),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or(LocalError::BadDevice(s)),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

impl DeviceSpec {
    /// Open the device. A GPU device in a CPU-only build is a clear error, not a panic.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(LocalError::DeviceNotCompiled {
                        device: self.to_string(),
                        feature: "cuda",
                    });
                }
                Device::new_cuda(n).map_err(LocalError::Compute)
            }
            Self::Metal => {
                if !cfg!(feature = "metal") {
                    return Err(LocalError::DeviceNotCompiled {
                        device: self.to_string(),
                        feature: "metal",
                    });
                }
                Device::new_metal(0).map_err(LocalError::Compute)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() -> Result<()> {
        assert_eq!("cpu".parse::<DeviceSpec>()?, DeviceSpec::Cpu);
        assert_eq!("CUDA:2".parse::<DeviceSpec>()?, DeviceSpec::Cuda(2));
        assert_eq!("cuda".parse::<DeviceSpec>()?, DeviceSpec::Cuda(0));
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_cpu_build_is_a_typed_error() {
        let err = DeviceSpec::Cuda(0).open().err();
        assert!(matches!(
            err,
            Some(LocalError::DeviceNotCompiled {
                feature: "cuda",
                ..
            })
        ));
    }
}
