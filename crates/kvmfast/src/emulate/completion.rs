//! The state one completion works on, handed to the family that completes the
//! instruction.

use iced_x86::Mnemonic;

use super::cpu::Cpu;
use super::decode::Decoded;
use super::host_quirks::HostQuirks;
use super::linear::GuestView;

/// Everything one completion works with.
pub struct Completion<'a> {
    pub cpu: Cpu<'a>,
    pub memory: GuestView<'a>,
    pub decoded: Decoded,
    pub quirks: &'a HostQuirks,
    /// Instructions completed after `decoded` on this exit, in order.
    pub also: Vec<Mnemonic>,
}

impl Completion<'_> {
    /// RIP past the instruction.
    pub fn advance(&mut self) {
        let next = self.decoded.next_rip();
        self.cpu.advance(next);
    }
}
