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

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use super::*;
    use crate::address_map::{MMIO_SPACE, PIO_SPACE};

    const DATA: usize = 0x100;

    fn map(space: u128, ranges: &[(u64, u64, Handler)]) -> RwLock<RangeMap<Handler>> {
        let mut map = RangeMap::new(space);
        for (base, length, handler) in ranges {
            map.insert(*base, *length, handler.clone()).unwrap();
        }
        RwLock::new(map)
    }

    fn io_exit(port: u16, size: usize, count: usize, is_write: bool) -> IoExit {
        IoExit {
            is_write,
            size,
            port,
            count,
            data_offset: DATA,
        }
    }

    /// A page holding an I/O exit whose elements are 0x5a5a..: a read must replace them.
    fn io_page(io: &IoExit, values: &[u64]) -> RunPage {
        let page = RunPage::anonymous();
        page.put_io(io);
        for index in 0..io.count {
            let value = values.get(index).copied().unwrap_or(0x5a5a_5a5a_5a5a_5a5a);
            page.set_io_value(io, index, value);
        }
        page
    }

    fn mmio_page(phys_addr: u64, len: usize, is_write: bool, data: [u8; 8]) -> RunPage {
        let page = RunPage::anonymous();
        page.put_mmio(&MmioExit {
            phys_addr,
            data,
            len,
            is_write,
        });
        page
    }

    #[test]
    fn an_unmapped_port_read_is_all_ones_of_its_size_and_has_no_owner() {
        let ports = map(PIO_SPACE, &[(0x60, 1, Handler::Exit)]);
        for size in [1, 2, 4] {
            let exit = io_exit(0x61, size, 1, false);
            let page = io_page(&exit, &[]);
            let (base, result) = io(&page, &ports);
            let dispatched = result.unwrap();
            assert_eq!(base, None, "counted as unmapped");
            assert_eq!(page.io_value(&exit, 0), all_ones(size));
            assert_eq!(dispatched.access.value, all_ones(size));
            assert_eq!(dispatched.access.size, size);
            assert!(!dispatched.access.is_write);
            assert_eq!(dispatched.device_exit, None);
        }
    }

    #[test]
    fn a_string_in_from_a_null_sink_fills_every_element_and_nothing_after() {
        let ports = map(PIO_SPACE, &[(0x1f0, 8, Handler::Null)]);
        let exit = io_exit(0x1f0, 2, 3, false);
        let page = io_page(&exit, &[]);
        let after = io_exit(0x1f0, 2, 4, false);
        page.set_io_value(&after, 3, 0x5a5a);
        let (base, result) = io(&page, &ports);
        assert_eq!(base, Some(0x1f0));
        assert_eq!(result.unwrap().device_exit, None);
        for index in 0..3 {
            assert_eq!(page.io_value(&exit, index), 0xffff);
        }
        assert_eq!(page.io_value(&after, 3), 0x5a5a);
    }

    #[test]
    fn an_out_to_an_exit_sink_ends_the_run_with_the_last_element() {
        let ports = map(PIO_SPACE, &[(0xf4, 1, Handler::Exit)]);
        let exit = io_exit(0xf4, 1, 2, true);
        let page = io_page(&exit, &[0x01, 0x07]);
        let (base, result) = io(&page, &ports);
        let dispatched = result.unwrap();
        assert_eq!(base, Some(0xf4));
        assert_eq!(dispatched.device_exit, Some(0x07));
        // The trace hook and run_once see the first element.
        assert_eq!(dispatched.access.value, 0x01);
        assert!(dispatched.access.is_write);
        assert_eq!(dispatched.access.address, 0xf4);
    }

    #[test]
    fn an_in_from_an_exit_sink_reads_all_ones_and_does_not_end_the_run() {
        let ports = map(PIO_SPACE, &[(0xf4, 1, Handler::Exit)]);
        let exit = io_exit(0xf4, 4, 1, false);
        let page = io_page(&exit, &[]);
        let (_, result) = io(&page, &ports);
        assert_eq!(result.unwrap().device_exit, None);
        assert_eq!(page.io_value(&exit, 0), 0xffff_ffff);
    }

    #[test]
    fn an_out_to_a_null_sink_or_nobody_is_dropped() {
        let ports = map(PIO_SPACE, &[(0x80, 1, Handler::Null)]);
        for port in [0x80, 0x81] {
            let exit = io_exit(port, 1, 1, true);
            let page = io_page(&exit, &[0x42]);
            let (base, result) = io(&page, &ports);
            assert_eq!(base, (port == 0x80).then_some(0x80));
            let dispatched = result.unwrap();
            assert_eq!(dispatched.device_exit, None);
            assert_eq!(dispatched.access.value, 0x42);
            assert_eq!(page.io_value(&exit, 0), 0x42);
        }
    }

    #[test]
    fn string_io_elements_beyond_the_page_are_neither_read_nor_written() {
        let ports = map(PIO_SPACE, &[]);
        let exit = IoExit {
            data_offset: 4096 - 2,
            ..io_exit(0x70, 2, 3, false)
        };
        let page = RunPage::anonymous();
        page.put_io(&exit);
        let (_, result) = io(&page, &ports);
        result.unwrap();
        // The first element fits; the others would leave the page and are skipped.
        assert_eq!(page.io_value(&exit, 0), 0xffff);
        assert_eq!(page.io_value(&exit, 1), 0);
    }

    #[test]
    fn an_unmapped_mmio_read_is_all_ones_of_its_length() {
        let regions = map(MMIO_SPACE, &[(0xfee0_0000, 0x1000, Handler::Exit)]);
        for len in [1, 2, 4, 8] {
            let page = mmio_page(0xd000_0000, len, false, [0x5a; 8]);
            let (base, result) = mmio(&page, &regions);
            let dispatched = result.unwrap();
            assert_eq!(base, None, "counted as unmapped");
            let mut expected = [0u8; 8];
            expected[..len].fill(0xff);
            assert_eq!(page.mmio().data, expected);
            assert_eq!(dispatched.access.value, all_ones(len));
            assert_eq!(dispatched.access.size, len);
        }
    }

    #[test]
    fn an_mmio_write_to_an_exit_sink_is_the_little_endian_value_of_its_bytes() {
        let regions = map(MMIO_SPACE, &[(0xfee0_0000, 0x1000, Handler::Exit)]);
        let data = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
        for (len, value) in [
            (1, 0x11),
            (2, 0x2211),
            (4, 0x4433_2211),
            (8, 0x8877_6655_4433_2211),
        ] {
            let page = mmio_page(0xfee0_00b0, len, true, data);
            let (base, result) = mmio(&page, &regions);
            let dispatched = result.unwrap();
            assert_eq!(base, Some(0xfee0_0000), "counted under the range's base");
            assert_eq!(dispatched.device_exit, Some(value));
            assert_eq!(dispatched.access.value, value);
            assert_eq!(dispatched.access.address, 0xfee0_00b0);
            assert!(dispatched.access.is_write);
        }
    }

    #[test]
    fn an_mmio_read_from_an_exit_sink_is_all_ones_and_does_not_end_the_run() {
        let regions = map(MMIO_SPACE, &[(0x1000, 0x10, Handler::Exit)]);
        let page = mmio_page(0x100f, 1, false, [0; 8]);
        let (base, result) = mmio(&page, &regions);
        assert_eq!(base, Some(0x1000));
        assert_eq!(result.unwrap().device_exit, None);
        assert_eq!(page.mmio().data[0], 0xff);
    }
}
