//! The NVIDIA source: CUDA (through cudarc's driver API) for free memory and a liveness
//! round-trip, NVML (through nvml-wrapper) for utilisation, temperature, power, ECC,
//! remapped rows, throttle reasons and Xid events. Both libraries are loaded at run time,
//! so this builds and starts on a machine without CUDA — and there fails with
//! [`ProbeError::NoDriver`] instead of a panic.
//!
//! Each device has a worker thread that owns its CUDA context (a fresh context costs
//! 100–220 ms, so it is kept) and runs the liveness round-trip — a 1 MiB host → device →
//! host copy and a synchronize. The reader waits for it with a deadline: a hung GPU is
//! reported as hung while its worker stays stuck, and the agent keeps serving.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cudarc::driver::{sys, CudaContext};
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    EccCounter, MemoryError, TemperatureSensor, TemperatureThreshold,
};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::Nvml;

use super::{GpuSource, ProbeError, Reading};
use crate::{EccCounts, GpuReport, Liveness, LivenessState, RemappedRows, XidEvent};

/// Bytes copied by the liveness round-trip.
const LIVENESS_BYTES: usize = 1 << 20;
/// Xid events kept per device.
const MAX_XIDS: usize = 16;

/// Whether the CUDA driver library can be loaded. cudarc panics on first use when it
/// cannot, so this is asked before anything else.
#[allow(unsafe_code)]
pub fn libcuda_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library under its usual
    // names and drops the handle; it calls no symbol from it.
    unsafe { sys::is_culib_present() }
}

/// Runs a driver call, turning a panic inside the binding (a symbol missing from an old
/// driver) into an error.
fn guarded<T>(
    call: &'static str,
    f: impl FnOnce() -> Result<T, cudarc::driver::DriverError>,
) -> Result<T, ProbeError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ProbeError::Driver {
            call,
            message: e.to_string(),
        }),
        Err(panic) => Err(ProbeError::Unsupported {
            call,
            message: panic_message(&panic),
        }),
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic in the CUDA binding".into())
}

/// What a device worker measured.
struct Probe {
    free_bytes: u64,
    total_bytes: u64,
    liveness: Liveness,
}

struct Worker {
    ordinal: usize,
    name: String,
    compute_capability: String,
    pci: (i32, i32, i32),
    requests: Sender<()>,
    replies: Receiver<Probe>,
    /// A probe was sent and never answered: the device is hung until it answers.
    outstanding: bool,
}

fn spawn_worker(ordinal: usize) -> Result<Worker, ProbeError> {
    let (info_tx, info_rx) = mpsc::channel();
    let (req_tx, req_rx) = mpsc::channel::<()>();
    let (rep_tx, rep_rx) = mpsc::channel::<Probe>();
    std::thread::Builder::new()
        .name(format!("gpu-{ordinal}"))
        .spawn(move || {
            let setup = guarded("cuCtxCreate", || {
                let ctx = CudaContext::new(ordinal)?;
                let name = ctx.name()?;
                let (major, minor) = ctx.compute_capability()?;
                let attr = |a| ctx.attribute(a);
                let pci = (
                    attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
                    attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
                    attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?,
                );
                Ok((ctx, name, format!("{major}.{minor}"), pci))
            });
            let ctx = match setup {
                Ok((ctx, name, cc, pci)) => {
                    let _ = info_tx.send(Ok((name, cc, pci)));
                    ctx
                }
                Err(e) => {
                    let _ = info_tx.send(Err(e));
                    return;
                }
            };
            let host = vec![0xA5u8; LIVENESS_BYTES];
            while req_rx.recv().is_ok() {
                if rep_tx.send(probe(&ctx, &host)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| ProbeError::Driver {
            call: "spawn device worker",
            message: e.to_string(),
        })?;
    let (name, compute_capability, pci) = info_rx.recv().map_err(|_| ProbeError::Driver {
        call: "cuCtxCreate",
        message: "the device worker exited".into(),
    })??;
    Ok(Worker {
        ordinal,
        name,
        compute_capability,
        pci,
        requests: req_tx,
        replies: rep_rx,
        outstanding: false,
    })
}

/// Free memory and the liveness round-trip, on the device's own thread.
fn probe(ctx: &Arc<CudaContext>, host: &[u8]) -> Probe {
    let mem = guarded("cuMemGetInfo", || ctx.mem_get_info());
    let started = Instant::now();
    let round_trip = guarded("liveness round-trip", || {
        let stream = ctx.default_stream();
        let dev = stream.clone_htod(host)?;
        let back = stream.clone_dtoh(&dev)?;
        stream.synchronize()?;
        Ok(back.len() == host.len() && back.first() == host.first())
    });
    let liveness = match round_trip {
        Ok(true) => Liveness {
            state: LivenessState::Ok,
            round_trip_ms: Some(started.elapsed().as_secs_f64() * 1e3),
            error: None,
        },
        Ok(false) => Liveness {
            state: LivenessState::Failed,
            round_trip_ms: None,
            error: Some("data read back differs from data written".into()),
        },
        Err(e) => Liveness {
            state: LivenessState::Failed,
            round_trip_ms: None,
            error: Some(e.to_string()),
        },
    };
    let (free, total) = mem.unwrap_or((0, 0));
    Probe {
        free_bytes: free as u64,
        total_bytes: total as u64,
        liveness,
    }
}

/// Reads every NVIDIA device on the node.
pub struct NvidiaSource {
    workers: Vec<Worker>,
    nvml: Option<Nvml>,
    /// NVML index of each worker (matched by PCI address).
    nvml_index: Vec<Option<u32>>,
    driver_version: Option<String>,
    liveness_timeout: Duration,
    xids: Arc<Mutex<HashMap<u32, Vec<XidEvent>>>>,
}

impl NvidiaSource {
    /// Opens the driver and every device. Errors: no driver, no devices, a failing or
    /// incomplete driver.
    pub fn open(liveness_timeout: Duration) -> Result<Self, ProbeError> {
        if !libcuda_present() {
            return Err(ProbeError::NoDriver);
        }
        let count = guarded("cuDeviceGetCount", CudaContext::device_count)?;
        if count <= 0 {
            return Err(ProbeError::NoDevices);
        }
        let workers = (0..count as usize)
            .map(spawn_worker)
            .collect::<Result<Vec<_>, _>>()?;
        let nvml = match Nvml::init() {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "NVML unavailable: utilisation, temperature, power, ECC and throttling will be missing");
                None
            }
        };
        let driver_version = nvml.as_ref().and_then(|n| n.sys_driver_version().ok());
        let nvml_index = workers
            .iter()
            .map(|w| nvml.as_ref().and_then(|n| nvml_index_for(n, w.pci)))
            .collect();
        let xids = Arc::new(Mutex::new(HashMap::new()));
        spawn_xid_listener(Arc::clone(&xids));
        Ok(Self {
            workers,
            nvml,
            nvml_index,
            driver_version,
            liveness_timeout,
            xids,
        })
    }
}

fn nvml_index_for(nvml: &Nvml, (domain, bus, device): (i32, i32, i32)) -> Option<u32> {
    let count = nvml.device_count().ok()?;
    (0..count).find(|i| {
        nvml.device_by_index(*i)
            .and_then(|d| d.pci_info())
            .is_ok_and(|p| {
                p.domain as i32 == domain && p.bus as i32 == bus && p.device as i32 == device
            })
    })
}

/// Listens for critical Xid events: one thread per device, each with its own NVML handle
/// and event set (the wait blocks, and a set that fails to register is consumed).
fn spawn_xid_listener(xids: Arc<Mutex<HashMap<u32, Vec<XidEvent>>>>) {
    let Ok(count) = Nvml::init().and_then(|n| n.device_count()) else {
        return;
    };
    for index in 0..count {
        let xids = Arc::clone(&xids);
        let _ = std::thread::Builder::new()
            .name(format!("xid-{index}"))
            .spawn(move || listen_xids(index, &xids));
    }
}

fn listen_xids(index: u32, xids: &Mutex<HashMap<u32, Vec<XidEvent>>>) {
    let Ok(nvml) = Nvml::init() else { return };
    let Ok(device) = nvml.device_by_index(index) else {
        return;
    };
    let Ok(set) = nvml.create_event_set() else {
        return;
    };
    let set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
        Ok(set) => set,
        Err(e) => {
            tracing::info!(device = index, error = %e.error, "Xid events unavailable on this device");
            return;
        }
    };
    loop {
        let Ok(event) = set.wait(1000) else { continue };
        let xid = match event.event_data {
            Some(XidError::Value(x)) => x,
            Some(XidError::Unknown) | None => 0,
        };
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        tracing::warn!(device = index, xid, "Xid event");
        if let Ok(mut map) = xids.lock() {
            let list = map.entry(index).or_default();
            list.push(XidEvent { xid, at_unix_ms });
            let excess = list.len().saturating_sub(MAX_XIDS);
            list.drain(..excess);
        }
    }
}

fn throttle_names(r: ThrottleReasons) -> Vec<String> {
    [
        (ThrottleReasons::GPU_IDLE, "gpu_idle"),
        (
            ThrottleReasons::APPLICATIONS_CLOCKS_SETTING,
            "applications_clocks_setting",
        ),
        (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
        (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
        (ThrottleReasons::SYNC_BOOST, "sync_boost"),
        (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
        (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
        (
            ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
            "hw_power_brake_slowdown",
        ),
        (
            ThrottleReasons::DISPLAY_CLOCK_SETTING,
            "display_clock_setting",
        ),
    ]
    .into_iter()
    .filter(|(flag, _)| r.contains(*flag))
    .map(|(_, name)| name.to_string())
    .collect()
}

fn field_u64(
    v: &Result<
        nvml_wrapper::struct_wrappers::device::FieldValueSample,
        nvml_wrapper::error::NvmlError,
    >,
) -> Option<u64> {
    match v.as_ref().ok()?.value.as_ref().ok()? {
        SampleValue::U32(x) => Some(u64::from(*x)),
        SampleValue::U64(x) => Some(*x),
        SampleValue::I64(x) => u64::try_from(*x).ok(),
        SampleValue::F64(x) => Some(*x as u64),
    }
}

/// Fills the NVML part of a report. Every field a device does not support stays `None`
/// (Hopper, for one, answers "not supported" for retired pages).
fn read_nvml(nvml: &Nvml, index: u32, r: &mut GpuReport) {
    let Ok(d) = nvml.device_by_index(index) else {
        return;
    };
    r.uuid = d.uuid().ok();
    if let Ok(u) = d.utilization_rates() {
        r.utilization_gpu_pct = Some(u.gpu);
        r.utilization_memory_pct = Some(u.memory);
    }
    r.temperature_c = d.temperature(TemperatureSensor::Gpu).ok();
    r.temperature_slowdown_c = d.temperature_threshold(TemperatureThreshold::Slowdown).ok();
    r.power_w = d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0);
    r.power_limit_w = d
        .enforced_power_limit()
        .ok()
        .map(|mw| f64::from(mw) / 1000.0);
    let ecc = |e, c| d.total_ecc_errors(e, c).ok();
    r.ecc = EccCounts {
        corrected_volatile: ecc(MemoryError::Corrected, EccCounter::Volatile),
        uncorrected_volatile: ecc(MemoryError::Uncorrected, EccCounter::Volatile),
        corrected_aggregate: ecc(MemoryError::Corrected, EccCounter::Aggregate),
        uncorrected_aggregate: ecc(MemoryError::Uncorrected, EccCounter::Aggregate),
    };
    // NVML field ids 142-145: NVML_FI_DEV_REMAPPED_{COR,UNC,PENDING,FAILURE}.
    if let Ok(v) = d.field_values_for(&[FieldId(142), FieldId(143), FieldId(144), FieldId(145)]) {
        r.remapped_rows = RemappedRows {
            correctable: v.first().and_then(field_u64),
            uncorrectable: v.get(1).and_then(field_u64),
            pending: v.get(2).and_then(field_u64).map(|x| x != 0),
            failure: v.get(3).and_then(field_u64).map(|x| x != 0),
        };
    }
    if let Ok(t) = d.current_throttle_reasons() {
        r.throttle_reasons = throttle_names(t);
    }
    if r.memory_total_bytes == 0 {
        if let Ok(m) = d.memory_info() {
            r.memory_total_bytes = m.total;
            r.memory_free_bytes = m.free;
        }
    }
}

impl GpuSource for NvidiaSource {
    fn name(&self) -> &'static str {
        "nvidia"
    }

    fn read(&mut self) -> Result<Reading, ProbeError> {
        // Ask every idle worker at once, then collect with one shared deadline.
        for w in self.workers.iter_mut().filter(|w| !w.outstanding) {
            if w.requests.send(()).is_ok() {
                w.outstanding = true;
            }
        }
        let deadline = Instant::now() + self.liveness_timeout;
        let xids = self.xids.lock().map(|m| m.clone()).unwrap_or_default();
        let mut devices = Vec::with_capacity(self.workers.len());
        for (i, w) in self.workers.iter_mut().enumerate() {
            let wait = deadline.saturating_duration_since(Instant::now());
            let probe = match w.replies.recv_timeout(wait) {
                Ok(p) => {
                    w.outstanding = false;
                    Some(p)
                }
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(Probe {
                    free_bytes: 0,
                    total_bytes: 0,
                    liveness: Liveness {
                        state: LivenessState::Failed,
                        round_trip_ms: None,
                        error: Some("device worker exited".into()),
                    },
                }),
            };
            let index = self.nvml_index[i].unwrap_or(w.ordinal as u32);
            let mut r = GpuReport {
                index,
                name: w.name.clone(),
                compute_capability: Some(w.compute_capability.clone()),
                ..GpuReport::default()
            };
            match probe {
                Some(p) => {
                    r.memory_total_bytes = p.total_bytes;
                    r.memory_free_bytes = p.free_bytes;
                    r.liveness = p.liveness;
                }
                None => {
                    r.liveness = Liveness {
                        state: LivenessState::Hung,
                        round_trip_ms: None,
                        error: Some(format!(
                            "no answer within {} ms",
                            self.liveness_timeout.as_millis()
                        )),
                    }
                }
            }
            if let (Some(nvml), Some(ni)) = (&self.nvml, self.nvml_index[i]) {
                read_nvml(nvml, ni, &mut r);
            }
            r.xid_events = xids.get(&index).cloned().unwrap_or_default();
            devices.push(r);
        }
        Ok(Reading {
            driver_version: self.driver_version.clone(),
            devices,
        })
    }
}
