//! The Python face of a virtio device (kvmfast.VirtioDevice) and of its queue handlers
//! (kvmfast.VirtioQueueHandler, which EventLoop.add runs natively on its thread).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::MAX_QUEUE_SIZE;
use super::blk::Block;
use super::device::{Backend, DeviceCore, TapWatch, VsockWatch};
use super::disk::Disk;
use super::net::backend::Net;
use super::net::mac::{parse_mac, random_mac};
use super::net::tap::Tap;
use super::queue::QueueConfig;
use super::queue_state::QueueState;
use super::vsock::Vsock;
use crate::errors::io_error;
use crate::eventfd::EventFd;
use crate::fd_watch::FdHandler;
use crate::vm::Vm;

create_exception!(
    kvmfast,
    VirtioError,
    PyValueError,
    "A virtio device cannot be made or activated: a bad, missing or locked image, a TAP that cannot be attached, a bad MAC address, a bad vsock CID or a vsock socket path in use, a bad queue setup."
);

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add("VirtioError", module.py().get_type::<VirtioError>())?;
    module.add_class::<VirtioDevice>()?;
    module.add_class::<VirtioQueueHandler>()?;
    Ok(())
}

/// Serves one queue of a device on the event loop thread, without Python.
#[pyclass(frozen, module = "kvmfast")]
pub struct VirtioQueueHandler {
    core: Arc<DeviceCore>,
    queue: usize,
}

impl VirtioQueueHandler {
    /// What the event loop calls: the device and the queue to serve.
    pub fn target(&self) -> (Arc<DeviceCore>, usize) {
        (self.core.clone(), self.queue)
    }
}

#[pymethods]
impl VirtioQueueHandler {
    #[getter]
    fn queue(&self) -> usize {
        self.queue
    }

    fn __repr__(&self) -> String {
        format!(
            "VirtioQueueHandler(device_type={}, queue={})",
            self.core.device_type(),
            self.queue
        )
    }
}

/// A virtio device whose queues are served in Rust (blk, rng, net, vsock).
#[pyclass(frozen, module = "kvmfast")]
pub struct VirtioDevice {
    core: Arc<DeviceCore>,
    notifiers: Vec<Py<EventFd>>,
    interrupts: Vec<Py<EventFd>>,
    config_interrupt: Py<EventFd>,
}

fn python_eventfd(py: Python<'_>, fd: &OwnedFd) -> PyResult<Py<EventFd>> {
    Py::new(
        py,
        EventFd::from_owned(fd.try_clone().map_err(io_error)?, true),
    )
}

impl VirtioDevice {
    fn with_core(py: Python<'_>, core: DeviceCore) -> PyResult<Self> {
        let queues = 0..core.num_queues();
        let mut notifiers = Vec::new();
        let mut interrupts = Vec::new();
        for queue in queues {
            if let (Some(notifier), Some(interrupt)) = (core.notifier(queue), core.interrupt(queue))
            {
                notifiers.push(python_eventfd(py, notifier)?);
                interrupts.push(python_eventfd(py, interrupt)?);
            }
        }
        let config_interrupt = python_eventfd(py, core.config_interrupt())?;
        Ok(Self {
            core: Arc::new(core),
            notifiers,
            interrupts,
            config_interrupt,
        })
    }

    fn queue_index(&self, queue: usize) -> PyResult<usize> {
        if queue < self.core.num_queues() {
            Ok(queue)
        } else {
            Err(VirtioError::new_err(format!(
                "queue {queue}: the device has {} queue(s)",
                self.core.num_queues()
            )))
        }
    }
}

#[pymethods]
impl VirtioDevice {
    /// A virtio-blk device over the raw image at `path`.
    #[staticmethod]
    #[pyo3(signature = (path, *, readonly = false, direct = false, serial = None))]
    fn block(
        py: Python<'_>,
        path: PathBuf,
        readonly: bool,
        direct: bool,
        serial: Option<&str>,
    ) -> PyResult<Self> {
        let path = path
            .to_str()
            .ok_or_else(|| VirtioError::new_err(format!("{path:?} is not a UTF-8 path")))?
            .to_string();
        let disk = Disk::open(&path, readonly, direct)
            .map_err(|error| VirtioError::new_err(error.to_string()))?;
        let block = Block::new(disk, serial)
            .map_err(|error| VirtioError::new_err(format!("disk image {path}: {error}")))?;
        let core = DeviceCore::new(Backend::Block(block)).map_err(io_error)?;
        Self::with_core(py, core)
    }

    /// A virtio-rng device fed by the host's getrandom.
    #[staticmethod]
    fn rng(py: Python<'_>) -> PyResult<Self> {
        let core = DeviceCore::new(Backend::Rng).map_err(io_error)?;
        Self::with_core(py, core)
    }

    /// A virtio-net device on the TAP `tap` (attached, or created if there is none),
    /// or on a new TAP whose name the kernel picks (`tap_name` says which); `mac` the
    /// guest's address ("52:54:00:12:34:56"), random under 52:54:00 if None.
    #[staticmethod]
    #[pyo3(signature = (tap = None, mac = None))]
    fn net(py: Python<'_>, tap: Option<&str>, mac: Option<&str>) -> PyResult<Self> {
        let mac = match mac {
            Some(text) => parse_mac(text).map_err(VirtioError::new_err)?,
            None => random_mac(),
        };
        let tap = Tap::open(tap).map_err(|error| VirtioError::new_err(error.to_string()))?;
        let core = DeviceCore::new(Backend::Net(Net::new(tap, mac))).map_err(io_error)?;
        Self::with_core(py, core)
    }

    /// A virtio-vsock device for guest CID `cid` (3..2^32-1), its host side the Unix
    /// socket it listens on at `uds_path` (made 0600, removed by close()): a client
    /// writes `CONNECT <port>\n` to reach the guest's port and reads `OK <host port>\n`;
    /// a guest connecting to the host (CID 2) on port P reaches `<uds_path>_P`. Streams
    /// are not kept in a snapshot: restore_queue_states() has the device send the
    /// driver TRANSPORT_RESET (its sockets see their peers gone), as Firecracker does.
    #[staticmethod]
    fn vsock(py: Python<'_>, cid: u64, uds_path: PathBuf) -> PyResult<Self> {
        let vsock =
            Vsock::new(cid, &uds_path).map_err(|error| VirtioError::new_err(error.to_string()))?;
        let core = DeviceCore::new(Backend::Vsock(Box::new(vsock))).map_err(io_error)?;
        Self::with_core(py, core)
    }

    /// A virtio-vsock device's guest CID (None for other devices).
    #[getter]
    fn guest_cid(&self) -> Option<u64> {
        self.core.vsock().map(Vsock::cid)
    }

    /// A virtio-vsock device's listening socket (None for other devices).
    #[getter]
    fn uds_path(&self) -> Option<PathBuf> {
        self.core.vsock().map(|vsock| vsock.path().to_path_buf())
    }

    /// The TAP of a virtio-net device (None for other devices).
    #[getter]
    fn tap_name(&self) -> Option<String> {
        self.core.net().map(|net| net.tap().name().to_string())
    }

    /// A virtio-net device's MAC address ("52:54:00:12:34:56"; None for other devices).
    #[getter]
    fn mac(&self) -> Option<String> {
        let mac = self.core.net()?.mac();
        Some(mac.map(|byte| format!("{byte:02x}")).join(":"))
    }

    /// What EventLoop.add_readable watches for this device besides its doorbells: a
    /// virtio-net device's TAP, a virtio-vsock device's host sockets (None for
    /// devices with nothing to read).
    fn readable_handler(&self) -> Option<FdHandler> {
        if self.core.vsock().is_some() {
            return Some(FdHandler::new(Arc::new(VsockWatch(self.core.clone()))));
        }
        self.core.net()?;
        Some(FdHandler::new(Arc::new(TapWatch(self.core.clone()))))
    }

    #[getter]
    fn device_type(&self) -> u32 {
        self.core.device_type()
    }

    #[getter]
    fn num_queues(&self) -> usize {
        self.core.num_queues()
    }

    #[getter]
    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    #[getter]
    fn device_features(&self) -> u64 {
        self.core.features()
    }

    #[getter]
    fn config_size(&self) -> usize {
        self.core.config_size()
    }

    #[getter]
    fn needs_reset(&self) -> bool {
        self.core.needs_reset()
    }

    fn read_config(&self, offset: u64, size: u64) -> u64 {
        self.core.read_config(offset, size)
    }

    /// Nothing in the config of these devices is writable by the driver without a
    /// feature they do not offer (CONFIG_WCE for blk): writes are ignored.
    fn write_config(&self, offset: u64, size: u64, value: u64) {
        let _ = (offset, size, value);
    }

    fn queue_notifier(&self, py: Python<'_>, queue: usize) -> PyResult<Py<EventFd>> {
        Ok(self.notifiers[self.queue_index(queue)?].clone_ref(py))
    }

    fn queue_interrupt(&self, py: Python<'_>, queue: usize) -> PyResult<Py<EventFd>> {
        Ok(self.interrupts[self.queue_index(queue)?].clone_ref(py))
    }

    fn config_interrupt(&self, py: Python<'_>) -> Py<EventFd> {
        self.config_interrupt.clone_ref(py)
    }

    fn queue_handler(&self, queue: usize) -> PyResult<VirtioQueueHandler> {
        Ok(VirtioQueueHandler {
            core: self.core.clone(),
            queue: self.queue_index(queue)?,
        })
    }

    /// `queues`: per queue (size, desc, avail, used, enabled), as the driver set them.
    fn activate(
        &self,
        py: Python<'_>,
        vm: &Vm,
        driver_features: u64,
        queues: Vec<(u64, u64, u64, u64, bool)>,
    ) -> PyResult<()> {
        let configs: Vec<Option<QueueConfig>> = queues
            .into_iter()
            .map(|(size, desc, avail, used, enabled)| {
                enabled.then_some(QueueConfig {
                    size,
                    desc,
                    avail,
                    used,
                })
            })
            .collect();
        let ram = vm.ram_snapshot();
        let core = self.core.clone();
        // Without the GIL: activation waits for the queues' locks, which the loop
        // thread holds while it finishes a request.
        py.detach(move || core.activate(ram, driver_features, &configs))
            .map_err(|error| VirtioError::new_err(error.to_string()))
    }

    /// Stops processing and waits for a request in flight; no used-ring write or
    /// interrupt follows once it returns.
    fn reset(&self, py: Python<'_>) {
        let core = self.core.clone();
        py.detach(move || core.reset());
    }

    /// Serves no doorbell until resume(); returns once the request in flight (if any)
    /// has completed (a paused machine's RAM is left alone).
    fn pause(&self, py: Python<'_>) {
        let core = self.core.clone();
        py.detach(move || core.pause());
    }

    /// Serves doorbells again, and every queue once now (nothing rung meanwhile is lost).
    fn resume(&self) {
        self.core.resume();
    }

    /// reset() for good: no activation after it, and a disk image's lock is released
    /// (another process may then open it).
    fn close(&self, py: Python<'_>) {
        let core = self.core.clone();
        py.detach(move || core.close());
    }

    /// One dict per queue: ready, size, desc_table, avail_ring, used_ring, next_avail,
    /// next_used, event_idx, signalled_used (None when unknown).
    fn queue_states<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let core = self.core.clone();
        let states = py.detach(move || core.queue_states());
        states.iter().map(|state| state.to_dict(py)).collect()
    }

    /// After activate() and before the device serves anything: each ready queue
    /// continues from the given indices. VirtioError, nothing changed, for a bad list.
    fn restore_queue_states(&self, py: Python<'_>, states: &Bound<'_, PyAny>) -> PyResult<()> {
        let states = states
            .cast::<PyList>()
            .map_err(|_| VirtioError::new_err("queue states must be a list of dicts"))?
            .iter()
            .enumerate()
            .map(|(queue, dict)| QueueState::from_dict(queue, &dict))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| VirtioError::new_err(error.to_string()))?;
        let core = self.core.clone();
        py.detach(move || core.restore_queue_states(&states))
            .map_err(|error| VirtioError::new_err(error.to_string()))
    }

    fn counters(&self) -> HashMap<&'static str, u64> {
        self.core.counters.snapshot().into_iter().collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "VirtioDevice(device_type={}, queues={}, notifier_fd={})",
            self.core.device_type(),
            self.core.num_queues(),
            self.core.notifier(0).map_or(-1, AsRawFd::as_raw_fd)
        )
    }
}
