//! Where readings come from: the NVIDIA driver ([`nvidia`]) or a simulation whose state
//! is set over HTTP ([`simulated`]). Both produce the same [`Reading`].

#[cfg(feature = "nvidia")]
pub mod nvidia;
pub mod simulated;

use crate::GpuReport;

/// One reading of every device, before classification (verdicts unset).
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// The driver version, when known.
    pub driver_version: Option<String>,
    /// One report per device.
    pub devices: Vec<GpuReport>,
}

/// Why a source could not start or read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `libcuda` cannot be loaded: no NVIDIA driver on this machine.
    #[error("no NVIDIA driver: libcuda could not be loaded (is the NVIDIA driver installed and its library on the loader path?)")]
    NoDriver,
    /// The driver loaded but reports no device.
    #[error("the NVIDIA driver reports no CUDA device")]
    NoDevices,
    /// A driver call failed.
    #[error("CUDA driver: {call}: {message}")]
    Driver {
        /// The call.
        call: &'static str,
        /// What the driver said.
        message: String,
    },
    /// The driver library lacks a symbol this build needs, or a call panicked inside the
    /// binding.
    #[error("CUDA driver: {call} is unavailable in this driver ({message})")]
    Unsupported {
        /// The call.
        call: &'static str,
        /// Detail.
        message: String,
    },
}

/// A source of readings. `read` is called from one thread, once per interval.
pub trait GpuSource: Send {
    /// `nvidia` or `simulated`.
    fn name(&self) -> &'static str;
    /// Reads every device now.
    fn read(&mut self) -> Result<Reading, ProbeError>;
}
