//! Device choice: made once per process from a string such as `cpu` or `cuda:1`.

use crate::error::{LocalError, Result};
use candle_core::{DType, Device};

/// The CUDA version scripts/build-cuda compiles with (its `CUDARC_CUDA_VERSION`,
/// CUDA 13.4): candle's kernels are PTX, which only a driver of this CUDA
/// version or newer can load.
#[cfg(feature = "cuda")]
const CUDA_BUILT_FOR: std::ffi::c_int = 13040;

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
                self.check_cuda_driver()?;
                Device::new_cuda(n).map_err(|source| LocalError::CudaUnavailable {
                    device: self.to_string(),
                    source,
                })
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

impl DeviceSpec {
    /// Check, before candle touches the GPU, what can be checked: the driver
    /// is there (cudarc panics on first use when it is not: the CUDA build
    /// opens `libcuda.so.1` only when a GPU is asked for, see
    /// scripts/build-cuda), it is new enough for this build's PTX (a driver
    /// compiles PTX only from a toolkit no newer than itself), and GPU `n`
    /// exists. Each failure is its own typed error naming the fix.
    #[cfg(feature = "cuda")]
    fn check_cuda_driver(self) -> Result<()> {
        use cudarc::driver::{result, sys};
        let device = self.to_string();
        let mut version: std::ffi::c_int = 0;
        // SAFETY: is_culib_present only dlopens the driver library (running its
        // initialisers, as cudarc's own first use does) and drops it again;
        // cuDriverGetVersion writes one int through a valid pointer and may be
        // called before cuInit.
        #[expect(
            unsafe_code,
            reason = "the driver probe and its version are raw FFI in cudarc, without safe wrappers"
        )]
        let status = unsafe {
            if !sys::is_culib_present() {
                return Err(LocalError::CudaDriverMissing { device });
            }
            sys::cuDriverGetVersion(&mut version)
        };
        if status != sys::CUresult::CUDA_SUCCESS || version < CUDA_BUILT_FOR {
            return Err(LocalError::CudaDriverTooOld {
                device,
                found: format!("{}.{}", version / 1000, version % 1000 / 10),
                needed: format!("{}.{}", CUDA_BUILT_FOR / 1000, CUDA_BUILT_FOR % 1000 / 10),
            });
        }
        let cuda = |source| LocalError::CudaDriver {
            device: device.clone(),
            source,
        };
        result::init().map_err(cuda)?;
        let count = usize::try_from(result::device::get_count().map_err(cuda)?).unwrap_or(0);
        match self {
            Self::Cuda(n) if n >= count => Err(LocalError::CudaNoSuchDevice {
                device: device.clone(),
                count,
            }),
            _ => Ok(()),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn check_cuda_driver(self) -> Result<()> {
        Ok(())
    }

    /// The CUDA device index whisper.cpp should use, or `None` for the CPU.
    pub fn gpu_index(self) -> Option<usize> {
        match self {
            Self::Cuda(n) => Some(n),
            Self::Cpu | Self::Metal => None,
        }
    }
}

/// The float type encoders compute in on `device`: half precision on a GPU
/// (tensor cores, half the memory and bandwidth), F32 on the CPU, where F16
/// matmuls are slower than F32 and the PyTorch fixtures are F32.
pub fn encoder_dtype(device: &Device) -> DType {
    if device.is_cuda() || device.is_metal() {
        DType::F16
    } else {
        DType::F32
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

    #[test]
    fn encoders_use_f32_on_the_cpu() {
        assert_eq!(encoder_dtype(&Device::Cpu), DType::F32);
    }

    #[test]
    fn gpu_index_follows_the_device() -> Result<()> {
        assert_eq!("cuda:3".parse::<DeviceSpec>()?.gpu_index(), Some(3));
        assert_eq!(DeviceSpec::Cpu.gpu_index(), None);
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
