//! Port and MMIO exits: look the address up, let the owner answer, fill in read data.

use pyo3::prelude::*;

use crate::address_map::RangeMap;
use crate::handlers::{Handler, all_ones};
use crate::locks;
use crate::run_page::{IoExit, MmioExit, RunPage};

/// One guest access as the trace hook and run_once report it (first element for
/// string I/O).
#[derive(Debug, Clone, Copy, Default)]
pub struct Access {
    pub address: u64,
    pub size: usize,
    pub is_write: bool,
    pub value: u64,
}

/// The result of dispatching one exit.
#[derive(Debug, Clone, Copy)]
pub struct Dispatched {
    pub access: Access,
    /// Set when an ExitSink was written: the value that must end run().
    pub device_exit: Option<u64>,
}

/// The start of the range that owned the access (None when unmapped) and what its
/// handler did; the owner is known even when the handler raised.
pub type DispatchResult = (Option<u64>, PyResult<Dispatched>);

/// Finds the owner of `address`; the map's lock is held only for the look-up, so a
/// handler may change the map.
fn owner(map: &std::sync::RwLock<RangeMap<Handler>>, address: u64) -> (Option<u64>, Handler) {
    let map = locks::read(map);
    match map.lookup(address) {
        Some(range) => (Some(range.base), range.handler.clone()),
        None => (None, Handler::Null),
    }
}

/// KVM_EXIT_IO, including string I/O (count > 1, elements at data_offset).
///
/// When a Python handler raises, the remaining IN elements read all-ones so that the
/// next KVM_RUN completes the instruction consistently, and the error is returned.
pub fn io(page: &RunPage, map: &std::sync::RwLock<RangeMap<Handler>>) -> DispatchResult {
    let io = page.io();
    let (base, handler) = owner(map, u64::from(io.port));
    (base, io_with(page, &io, base, handler))
}

fn io_with(
    page: &RunPage,
    io: &IoExit,
    base: Option<u64>,
    handler: Handler,
) -> PyResult<Dispatched> {
    let io = *io;
    let offset = u64::from(io.port) - base.unwrap_or(u64::from(io.port));
    let fill_reads_from = |first: usize| {
        for index in first..io.count {
            page.set_io_value(&io, index, all_ones(io.size));
        }
    };
    let mut device_exit = None;
    match handler {
        Handler::Null if !io.is_write => fill_reads_from(0),
        Handler::Exit if !io.is_write => fill_reads_from(0),
        Handler::Null => {}
        Handler::Exit => device_exit = Some(page.io_value(&io, io.count.saturating_sub(1))),
        Handler::Python(device) => Python::attach(|py| -> PyResult<()> {
            for index in 0..io.count {
                if io.is_write {
                    device.write(py, offset, io.size, page.io_value(&io, index))?;
                } else {
                    match device.read(py, offset, io.size) {
                        Ok(value) => page.set_io_value(&io, index, value),
                        Err(err) => {
                            fill_reads_from(index);
                            return Err(err);
                        }
                    }
                }
            }
            Ok(())
        })?,
    }
    Ok(Dispatched {
        access: io_access(page, &io),
        device_exit,
    })
}

fn io_access(page: &RunPage, io: &IoExit) -> Access {
    Access {
        address: u64::from(io.port),
        size: io.size,
        is_write: io.is_write,
        value: page.io_value(io, 0),
    }
}

/// KVM_EXIT_MMIO: one access of 1 to 8 bytes, little-endian.
pub fn mmio(page: &RunPage, map: &std::sync::RwLock<RangeMap<Handler>>) -> DispatchResult {
    let mmio = page.mmio();
    let (base, handler) = owner(map, mmio.phys_addr);
    (base, mmio_with(page, &mmio, base, handler))
}

fn mmio_with(
    page: &RunPage,
    mmio: &MmioExit,
    base: Option<u64>,
    handler: Handler,
) -> PyResult<Dispatched> {
    let offset = mmio.phys_addr - base.unwrap_or(mmio.phys_addr);
    let mut device_exit = None;
    let value = if mmio.is_write {
        let mut bytes = [0u8; 8];
        bytes[..mmio.len].copy_from_slice(&mmio.data[..mmio.len]);
        let value = u64::from_le_bytes(bytes);
        match handler {
            Handler::Null => {}
            Handler::Exit => device_exit = Some(value),
            Handler::Python(device) => {
                Python::attach(|py| device.write(py, offset, mmio.len, value))?;
            }
        }
        value
    } else {
        let value = match handler {
            Handler::Null | Handler::Exit => Ok(all_ones(mmio.len)),
            Handler::Python(device) => Python::attach(|py| device.read(py, offset, mmio.len)),
        };
        // A failed read still completes the load (with all-ones) at the next entry.
        page.set_mmio_data(
            value
                .as_ref()
                .copied()
                .unwrap_or(all_ones(mmio.len))
                .to_le_bytes(),
        );
        value?
    };
    Ok(Dispatched {
        access: Access {
            address: mmio.phys_addr,
            size: mmio.len,
            is_write: mmio.is_write,
            value,
        },
        device_exit,
    })
}
