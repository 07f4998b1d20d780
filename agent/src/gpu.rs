//! GPU metrics joined into every window. NVML (through `nvml-wrapper`, which loads
//! `libnvidia-ml.so` at run time) is the real provider; a node without a GPU or a driver gets a
//! provider that reports the reason in every window. [`FakeGpuProvider`] exists for tests only.

use nvml_wrapper::{
    Nvml,
    enum_wrappers::device::{Clock, PcieUtilCounter, TemperatureSensor},
    enums::device::UsedGpuMemory,
    error::NvmlError,
};
use tokenflow_schema::{GpuDevice, GpuProcess, GpuWindow};

/// Something that can describe the node's GPUs now.
pub trait GpuProvider: Send {
    fn sample(&mut self) -> GpuWindow;
}

/// Opens NVML; when it cannot (no driver, no GPU) returns a provider that says why in each window.
pub fn detect() -> Box<dyn GpuProvider> {
    match Nvml::init() {
        Ok(nvml) => match nvml.device_count() {
            Ok(0) => Box::new(Unavailable::new("NVML found no GPU on this node")),
            Ok(_) => Box::new(NvmlProvider { nvml }),
            Err(e) => Box::new(Unavailable::new(format!(
                "NVML could not count devices: {e}"
            ))),
        },
        Err(e) => Box::new(Unavailable::new(describe_init_error(&e))),
    }
}

fn describe_init_error(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(_) => {
            "no NVIDIA driver: libnvidia-ml.so could not be loaded (normal on a node without a GPU)"
                .to_string()
        }
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".to_string(),
        other => format!("NVML failed to initialise: {other}"),
    }
}

/// The state of a node without usable GPUs.
pub struct Unavailable(String);

impl Unavailable {
    pub fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

impl GpuProvider for Unavailable {
    fn sample(&mut self) -> GpuWindow {
        GpuWindow {
            available: false,
            reason: Some(self.0.clone()),
            provider: "nvml".to_string(),
            driver_version: None,
            devices: Vec::new(),
        }
    }
}

pub struct NvmlProvider {
    nvml: Nvml,
}

impl GpuProvider for NvmlProvider {
    fn sample(&mut self) -> GpuWindow {
        let count = self.nvml.device_count().unwrap_or(0);
        let devices = (0..count).filter_map(|i| self.device(i)).collect();
        GpuWindow {
            available: true,
            reason: None,
            provider: "nvml".to_string(),
            driver_version: self.nvml.sys_driver_version().ok(),
            devices,
        }
    }
}

impl NvmlProvider {
    /// One device; each figure the driver refuses (not supported on this model, say) stays `None`.
    fn device(&self, index: u32) -> Option<GpuDevice> {
        let d = self.nvml.device_by_index(index).ok()?;
        let memory = d.memory_info().ok();
        let mut processes: Vec<GpuProcess> = d
            .running_compute_processes()
            .unwrap_or_default()
            .into_iter()
            .chain(d.running_graphics_processes().unwrap_or_default())
            .map(|p| GpuProcess {
                pid: p.pid,
                used_memory_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                },
            })
            .collect();
        processes.sort_by_key(|p| p.pid);
        processes.dedup_by_key(|p| p.pid);
        Some(GpuDevice {
            index,
            name: d.name().unwrap_or_default(),
            uuid: d.uuid().unwrap_or_default(),
            utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
            memory_used_bytes: memory.as_ref().map(|m| m.used),
            memory_total_bytes: memory.as_ref().map(|m| m.total),
            power_watts: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
            sm_clock_mhz: d.clock_info(Clock::SM).ok(),
            temperature_celsius: d.temperature(TemperatureSensor::Gpu).ok(),
            // NVML reports KB/s.
            pcie_tx_bytes_per_s: d
                .pcie_throughput(PcieUtilCounter::Send)
                .ok()
                .map(|k| u64::from(k) * 1024),
            pcie_rx_bytes_per_s: d
                .pcie_throughput(PcieUtilCounter::Receive)
                .ok()
                .map(|k| u64::from(k) * 1024),
            processes,
        })
    }
}

/// A stand-in GPU for tests of the window join and the exported metrics: its figures are made up
/// and its windows say `provider: "fake"`. Never selected outside tests.
pub struct FakeGpuProvider {
    pub devices: Vec<GpuDevice>,
}

impl GpuProvider for FakeGpuProvider {
    fn sample(&mut self) -> GpuWindow {
        GpuWindow {
            available: true,
            reason: None,
            provider: "fake".to_string(),
            driver_version: None,
            devices: self.devices.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without the NVIDIA driver (this one, CI), the real provider must report the
    /// absence, not crash. On a GPU node it must find devices with names and memory totals.
    #[test]
    fn real_provider_reports_absence_or_devices() {
        let w = detect().sample();
        assert_eq!(w.provider, "nvml");
        if w.available {
            assert!(!w.devices.is_empty());
            assert!(
                w.devices
                    .iter()
                    .all(|d| !d.name.is_empty() && d.memory_total_bytes.unwrap_or(0) > 0)
            );
        } else {
            let reason = w.reason.unwrap_or_default();
            assert!(!reason.is_empty());
            assert!(w.devices.is_empty());
            eprintln!("no GPU here: {reason}");
        }
    }

    #[test]
    fn absent_driver_reason_is_plain() {
        let e = NvmlError::DriverNotLoaded;
        assert!(describe_init_error(&e).contains("driver"));
    }
}
