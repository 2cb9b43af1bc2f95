//! FWAIT (SDM Vol. 2A "WAIT/FWAIT"): #NM when CR0.MP and CR0.TS, #MF when an unmasked
//! x87 exception is pending and CR0.NE=1, otherwise nothing.

use super::completion::Completion;
use super::cpu::{CR0_MP, CR0_NE, CR0_TS};
use super::exceptions::Fault;
use super::fpu_state::XsaveArea;
use super::stop::Stop;

pub fn complete_fwait(c: &mut Completion<'_>) -> Result<(), Stop> {
    let cr0 = c.cpu.sregs.cr0;
    if cr0 & CR0_MP != 0 && cr0 & CR0_TS != 0 {
        return Err(Stop::Fault(Fault::DeviceNotAvailable));
    }
    let area = XsaveArea::load(c.cpu.fd)?;
    if unmasked_exception_pending(area.fsw(), area.fcw()) {
        if cr0 & CR0_NE == 0 {
            // MS-DOS compatible reporting: FERR# to the PIC and IGNNE#; nothing here
            // drives those lines.
            return Err(Stop::Unsupported(
                "FWAIT with a pending x87 exception and CR0.NE=0 (FERR#/IGNNE# reporting)".into(),
            ));
        }
        return Err(Stop::Fault(Fault::FloatingPoint));
    }
    c.advance();
    Ok(())
}

/// FSW.ES, or an exception flag (IE, DE, ZE, OE, UE, PE) whose FCW mask bit is clear.
pub fn unmasked_exception_pending(fsw: u16, fcw: u16) -> bool {
    fsw & 0x80 != 0 || (fsw & 0x3f) & !(fcw & 0x3f) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_means_unmasked() {
        assert!(!unmasked_exception_pending(0x0001, 0x037f)); // IE masked
        assert!(unmasked_exception_pending(0x0001, 0x037e)); // IE unmasked
        assert!(unmasked_exception_pending(0x0080, 0x037f)); // ES
        assert!(!unmasked_exception_pending(0, 0));
    }
}
