//! Facts of the host's KVM that the completions depend on, found by probing (never
//! assumed): see probe.rs for how each is measured.

/// What the start-up probes found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostQuirks {
    /// A guest user-mode SYSCALL leaves CS/SS at CPL 3 and faults at LSTAR
    /// (../shared/HOST-KVM.md); the run loop then performs the SYSCALL itself.
    pub syscall_keeps_user_cs: bool,
    /// MXCSR_MASK of the processor.
    pub mxcsr_mask: u32,
}

impl HostQuirks {
    /// {"syscall_keeps_user_cs": 0/1, "mxcsr_mask": n}.
    pub fn to_map(&self) -> std::collections::BTreeMap<&'static str, u64> {
        [
            (
                "syscall_keeps_user_cs",
                u64::from(self.syscall_keeps_user_cs),
            ),
            ("mxcsr_mask", u64::from(self.mxcsr_mask)),
        ]
        .into_iter()
        .collect()
    }
}
