//! Delivery of an exception a completed instruction raised, through
//! KVM_SET_VCPU_EVENTS: the guest's own IDT handles it; RIP stays on the faulting
//! instruction, as for any fault.

use super::cpu::Cpu;
use super::exceptions::Fault;
use super::stop::Stop;

/// Raises `fault` in the guest: CR2 first for a #PF, then the exception as an event
/// KVM delivers at the next entry. The caller has left RIP on the instruction.
pub fn inject(cpu: &mut Cpu<'_>, fault: Fault) -> Result<(), Stop> {
    if let Fault::PageFault { address, .. } = fault {
        cpu.sregs_mut().cr2 = address;
    }
    cpu.store()?;
    let mut events = cpu.events()?;
    events.exception.injected = 1;
    events.exception.pending = 0;
    events.exception.nr = fault.vector();
    events.exception.has_error_code = u8::from(fault.error_code().is_some());
    events.exception.error_code = fault.error_code().unwrap_or(0);
    events.exception_has_payload = 0;
    events.exception_payload = 0;
    // Only the exception is new: flags 0 leaves NMI, SIPI, shadow and SMM state as KVM
    // has them (api.rst, KVM_SET_VCPU_EVENTS).
    events.flags = 0;
    cpu.set_events(&events)
}
