//! Guest memory as an instruction sees it: segment checks, paging, then RAM or an MMIO
//! device. A multi-byte access that crosses a page is translated page by page before
//! any byte moves, so that a fault on the second page leaves memory untouched (as the
//! CPU does for the accesses it completes here).

use std::cell::Cell;
use std::sync::RwLock;

use iced_x86::Register;
use kvm_bindings::kvm_segment;
use pyo3::prelude::*;

use super::cpu::{CR0_AM, Cpu, CpuState, RFLAGS_AC};
use super::exceptions::Fault;
use super::paging::{Access, PagingMode};
use super::stop::Stop;
use crate::address_map::RangeMap;
use crate::handlers::{Handler, all_ones};
use crate::locks;
use crate::memory::GuestRam;

const PAGE: u64 = 4096;

/// Guest memory as one completion sees it: RAM, the MMIO map, and the paging mode of
/// the exit (the Python-visible slot buffer is `memory::GuestMemory`).
pub struct GuestView<'a> {
    pub ram: &'a GuestRam,
    pub mmio: &'a RwLock<RangeMap<Handler>>,
    pub paging: PagingMode,
    /// Set when a store reached an ExitSink: run() ends with it after the instruction.
    pub device_exit: Cell<Option<u64>>,
}

/// One piece of an access that lies in a single page.
#[derive(Debug, Clone, Copy)]
struct Piece {
    physical: u64,
    length: usize,
}

impl GuestView<'_> {
    fn pieces(&self, linear: u64, length: usize, access: Access) -> Result<Vec<Piece>, Fault> {
        let mut pieces = Vec::with_capacity(2);
        let mut done = 0usize;
        while done < length {
            let address = linear.wrapping_add(done as u64);
            let in_page = (PAGE - (address & (PAGE - 1))) as usize;
            let piece = in_page.min(length - done);
            let physical = self.paging.translate(self.ram, address, access)?;
            pieces.push(Piece {
                physical,
                length: piece,
            });
            done += piece;
        }
        Ok(pieces)
    }

    /// Reads `out.len()` bytes at a linear address.
    pub fn read(&self, linear: u64, out: &mut [u8], access: Access) -> Result<(), Stop> {
        let pieces = self
            .pieces(linear, out.len(), access)
            .map_err(Stop::Fault)?;
        let mut done = 0;
        for piece in pieces {
            let slice = &mut out[done..done + piece.length];
            if !self.ram.read_into(piece.physical, slice) {
                self.mmio_read(piece.physical, slice)?;
            }
            done += piece.length;
        }
        Ok(())
    }

    /// Writes `data` at a linear address.
    pub fn write(&self, linear: u64, data: &[u8], access: Access) -> Result<(), Stop> {
        let pieces = self
            .pieces(linear, data.len(), access)
            .map_err(Stop::Fault)?;
        let mut done = 0;
        for piece in pieces {
            let slice = &data[done..done + piece.length];
            if !self.ram.write_from(piece.physical, slice) {
                self.mmio_write(piece.physical, slice)?;
            }
            done += piece.length;
        }
        Ok(())
    }

    /// Checks that the whole range could be written (page faults first), without writing.
    pub fn probe_write(&self, linear: u64, length: usize, access: Access) -> Result<(), Stop> {
        self.pieces(linear, length, access)
            .map(drop)
            .map_err(Stop::Fault)
    }

    /// The host address of a naturally aligned access inside one page of RAM, for the
    /// locked instructions that must be atomic against the other vCPUs.
    pub fn host_pointer(
        &self,
        linear: u64,
        length: usize,
        access: Access,
    ) -> Result<Option<*mut u8>, Stop> {
        let pieces = self.pieces(linear, length, access).map_err(Stop::Fault)?;
        if pieces.len() != 1 {
            return Ok(None);
        }
        Ok(self
            .ram
            .host_range(pieces[0].physical, length)
            .map(|p| p.as_ptr()))
    }

    pub fn read_u64(&self, linear: u64, access: Access) -> Result<u64, Stop> {
        let mut bytes = [0u8; 8];
        self.read(linear, &mut bytes, access)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Reads 1..8 bytes as a little-endian value.
    pub fn read_value(&self, linear: u64, size: usize, access: Access) -> Result<u64, Stop> {
        let mut bytes = [0u8; 8];
        self.read(linear, &mut bytes[..size.min(8)], access)?;
        Ok(u64::from_le_bytes(bytes))
    }

    pub fn write_value(
        &self,
        linear: u64,
        size: usize,
        value: u64,
        access: Access,
    ) -> Result<(), Stop> {
        self.write(linear, &value.to_le_bytes()[..size.min(8)], access)
    }

    /// Device reads in chunks of at most 8 bytes, as a bus would split them.
    fn mmio_read(&self, physical: u64, out: &mut [u8]) -> Result<(), Stop> {
        for (index, chunk) in out.chunks_mut(8).enumerate() {
            let address = physical + index as u64 * 8;
            let (base, handler) = self.owner(address);
            let value = match handler {
                Handler::Null | Handler::Exit => all_ones(chunk.len()),
                Handler::Python(device) => {
                    let offset = address - base.unwrap_or(address);
                    Python::attach(|py| device.read(py, offset, chunk.len())).map_err(Stop::Host)?
                }
            };
            chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
        }
        Ok(())
    }

    fn mmio_write(&self, physical: u64, data: &[u8]) -> Result<(), Stop> {
        for (index, chunk) in data.chunks(8).enumerate() {
            let address = physical + index as u64 * 8;
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            let value = u64::from_le_bytes(bytes);
            let (base, handler) = self.owner(address);
            match handler {
                Handler::Null => {}
                Handler::Exit => self.device_exit.set(Some(value)),
                Handler::Python(device) => {
                    let offset = address - base.unwrap_or(address);
                    Python::attach(|py| device.write(py, offset, chunk.len(), value))
                        .map_err(Stop::Host)?;
                }
            }
        }
        Ok(())
    }

    fn owner(&self, address: u64) -> (Option<u64>, Handler) {
        let map = locks::read(self.mmio);
        match map.lookup(address) {
            Some(range) => (Some(range.base), range.handler.clone()),
            None => (None, Handler::Null),
        }
    }
}

/// What kind of access a segment check is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    Read,
    Write,
}

/// The linear address of `segment:offset` for an access of `size` bytes, with the
/// segment checks of SDM Vol. 3A 5.3 (limits, types, null selectors) outside 64-bit
/// mode and the canonical check inside it.
pub fn linear_address(
    cpu: &Cpu<'_>,
    segment: Register,
    offset: u64,
    size: usize,
    intent: Intent,
) -> Result<u64, Fault> {
    let stack = segment == Register::SS;
    let fault = || {
        if stack {
            Fault::StackFault(0)
        } else {
            Fault::GeneralProtection(0)
        }
    };
    let descriptor = cpu.segment(segment).ok_or(Fault::GeneralProtection(0))?;
    if cpu.bitness() == 64 {
        let base = if matches!(segment, Register::FS | Register::GS) {
            descriptor.base
        } else {
            0
        };
        let linear = base.wrapping_add(offset);
        let last = linear.wrapping_add(size.saturating_sub(1) as u64);
        if !canonical(cpu, linear) || !canonical(cpu, last) {
            return Err(fault());
        }
        return Ok(linear);
    }
    if !cpu.protected_mode() || cpu.virtual_8086() {
        let offset = offset & 0xffff;
        if offset + size as u64 - 1 > u64::from(descriptor.limit.max(0xffff)) {
            return Err(fault());
        }
        return Ok(descriptor.base.wrapping_add(offset) & 0xffff_ffff);
    }
    check_segment(descriptor, offset, size, intent).map_err(|()| fault())?;
    Ok(descriptor.base.wrapping_add(offset) & 0xffff_ffff)
}

fn check_segment(
    descriptor: &kvm_segment,
    offset: u64,
    size: usize,
    intent: Intent,
) -> Result<(), ()> {
    if descriptor.unusable != 0 || descriptor.present == 0 {
        return Err(());
    }
    let code = descriptor.type_ & 8 != 0;
    let writable_or_readable = descriptor.type_ & 2 != 0;
    match intent {
        Intent::Write if code || !writable_or_readable => return Err(()),
        Intent::Read if code && !writable_or_readable => return Err(()),
        _ => {}
    }
    let last = offset + size as u64 - 1;
    let limit = u64::from(descriptor.limit);
    let expand_down = !code && descriptor.type_ & 4 != 0;
    if expand_down {
        let top = if descriptor.db != 0 {
            0xffff_ffff
        } else {
            0xffff
        };
        if offset <= limit || last > top {
            return Err(());
        }
    } else if last > limit {
        return Err(());
    }
    Ok(())
}

/// Bits 63:47 (63:56 with 5-level paging) must equal bit 47 (56).
pub fn canonical(cpu: &CpuState, address: u64) -> bool {
    let bits = if cpu.sregs.cr4 & super::cpu::CR4_LA57 != 0 {
        57
    } else {
        48
    };
    let shift = 64 - bits;
    ((address << shift) as i64 >> shift) as u64 == address
}

/// #AC(0) for a misaligned data access at CPL 3 with CR0.AM and EFLAGS.AC (SDM Vol. 3A
/// 6.15, interrupt 17).
pub fn alignment_check(cpu: &Cpu<'_>, linear: u64, alignment: u64) -> Result<(), Fault> {
    if alignment > 1
        && cpu.cpl() == 3
        && cpu.sregs.cr0 & CR0_AM != 0
        && cpu.rflags() & RFLAGS_AC != 0
        && linear % alignment != 0
    {
        return Err(Fault::AlignmentCheck);
    }
    Ok(())
}

/// The paging Access of an explicit data access by the instruction at the vCPU's CPL.
pub fn data_access(cpu: &Cpu<'_>, write: bool) -> Access {
    let user = cpu.cpl() == 3;
    let smap_allowed = !user && cpu.rflags() & RFLAGS_AC != 0;
    if write {
        Access::write(user, smap_allowed)
    } else {
        Access::read(user, smap_allowed)
    }
}
