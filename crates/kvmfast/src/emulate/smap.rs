//! CLAC and STAC (SDM Vol. 2A): clear or set EFLAGS.AC; #UD outside CPL 0.

use iced_x86::Mnemonic;

use super::completion::Completion;
use super::cpu::RFLAGS_AC;
use super::exceptions::Fault;
use super::stop::Stop;

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    // "#UD If the CPL > 0" (and in virtual-8086 mode, where the CPL is 3).
    if c.cpu.cpl() != 0 {
        return Err(Stop::Fault(Fault::InvalidOpcode));
    }
    let flags = c.cpu.rflags();
    let flags = if c.decoded.instruction.mnemonic() == Mnemonic::Clac {
        flags & !RFLAGS_AC
    } else {
        flags | RFLAGS_AC
    };
    c.cpu.set_rflags(flags);
    c.advance();
    Ok(())
}
