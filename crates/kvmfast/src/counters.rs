//! Per-vCPU exit counters: plain integers updated by the run loop, summed per VM.

use std::collections::HashMap;

use iced_x86::Mnemonic;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Names of KVM exit reasons, indexed by KVM_EXIT_* number (lower case, no prefix).
pub const EXIT_NAMES: [&str; 40] = [
    "unknown",
    "exception",
    "io",
    "hypercall",
    "debug",
    "hlt",
    "mmio",
    "irq_window_open",
    "shutdown",
    "fail_entry",
    "intr",
    "set_tpr",
    "tpr_access",
    "s390_sieic",
    "s390_reset",
    "dcr",
    "nmi",
    "internal_error",
    "osi",
    "papr_hcall",
    "s390_ucontrol",
    "watchdog",
    "s390_tsch",
    "epr",
    "system_event",
    "s390_stsi",
    "ioapic_eoi",
    "hyperv",
    "arm_nisv",
    "x86_rdmsr",
    "x86_wrmsr",
    "dirty_ring_full",
    "ap_reset_hold",
    "x86_bus_lock",
    "xen",
    "riscv_sbi",
    "riscv_csr",
    "notify",
    "loongarch_iocsr",
    "memory_fault",
];

/// The name under which an exit reason is reported; reasons newer than this table are
/// counted together as "other".
pub fn exit_name(reason: u32) -> &'static str {
    EXIT_NAMES.get(reason as usize).copied().unwrap_or("other")
}

fn exit_slot(reason: u32) -> usize {
    (reason as usize).min(EXIT_NAMES.len())
}

/// What one vCPU has seen.
#[derive(Debug, Clone)]
pub struct Counters {
    /// One slot per EXIT_NAMES entry plus "other".
    exits: [u64; EXIT_NAMES.len() + 1],
    pio: HashMap<u64, u64>,
    mmio: HashMap<u64, u64>,
    unmapped_pio: u64,
    unmapped_mmio: u64,
    /// NMIs that LINT1 requests queued (the LVT said NMI, unmasked).
    lint1_nmi: u64,
    /// Instructions KVM could not emulate that the VMM completed, by mnemonic.
    completions: HashMap<Mnemonic, u64>,
    /// Exceptions those instructions raised in the guest, by name ("#GP", "#PF", ...).
    emulation_exceptions: HashMap<&'static str, u64>,
    /// Host quirks repaired, by name.
    quirk_repairs: HashMap<&'static str, u64>,
    /// Profiler samples: guest RIP -> times seen (kept out of to_dict: see samples_dict).
    samples: HashMap<u64, u64>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            exits: [0; EXIT_NAMES.len() + 1],
            pio: HashMap::new(),
            mmio: HashMap::new(),
            unmapped_pio: 0,
            unmapped_mmio: 0,
            lint1_nmi: 0,
            completions: HashMap::new(),
            emulation_exceptions: HashMap::new(),
            quirk_repairs: HashMap::new(),
            samples: HashMap::new(),
        }
    }
}

impl Counters {
    #[inline]
    pub fn count_exit(&mut self, reason: u32) {
        self.exits[exit_slot(reason)] += 1;
    }

    /// An I/O exit that reached the range starting at `base`, or None when unmapped.
    #[inline]
    pub fn count_pio(&mut self, base: Option<u64>) {
        match base {
            Some(base) => *self.pio.entry(base).or_insert(0) += 1,
            None => self.unmapped_pio += 1,
        }
    }

    #[inline]
    pub fn count_mmio(&mut self, base: Option<u64>) {
        match base {
            Some(base) => *self.mmio.entry(base).or_insert(0) += 1,
            None => self.unmapped_mmio += 1,
        }
    }

    pub fn count_lint1_nmi(&mut self) {
        self.lint1_nmi += 1;
    }

    pub fn count_completion(&mut self, mnemonic: Mnemonic) {
        *self.completions.entry(mnemonic).or_insert(0) += 1;
    }

    pub fn count_emulation_exception(&mut self, name: &'static str) {
        *self.emulation_exceptions.entry(name).or_insert(0) += 1;
    }

    pub fn count_quirk_repair(&mut self, name: &'static str) {
        *self.quirk_repairs.entry(name).or_insert(0) += 1;
    }

    pub fn count_sample(&mut self, rip: u64) {
        *self.samples.entry(rip).or_insert(0) += 1;
    }

    /// {rip: samples}.
    pub fn samples_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (rip, n) in sorted(&self.samples) {
            dict.set_item(rip, n)?;
        }
        Ok(dict)
    }

    pub fn add(&mut self, other: &Counters) {
        for (mine, theirs) in self.exits.iter_mut().zip(other.exits.iter()) {
            *mine += theirs;
        }
        for (base, n) in &other.pio {
            *self.pio.entry(*base).or_insert(0) += n;
        }
        for (base, n) in &other.mmio {
            *self.mmio.entry(*base).or_insert(0) += n;
        }
        self.unmapped_pio += other.unmapped_pio;
        self.unmapped_mmio += other.unmapped_mmio;
        self.lint1_nmi += other.lint1_nmi;
        for (mnemonic, n) in &other.completions {
            *self.completions.entry(*mnemonic).or_insert(0) += n;
        }
        for (name, n) in &other.emulation_exceptions {
            *self.emulation_exceptions.entry(name).or_insert(0) += n;
        }
        for (name, n) in &other.quirk_repairs {
            *self.quirk_repairs.entry(name).or_insert(0) += n;
        }
        for (rip, n) in &other.samples {
            *self.samples.entry(*rip).or_insert(0) += n;
        }
    }

    /// {"exits": {name: n}, "pio": {base: n}, "mmio": {base: n}, "unmapped_pio": n,
    /// "unmapped_mmio": n, "lint1_nmi": n, "completions": {mnemonic: n},
    /// "emulation_exceptions": {"#GP": n}, "quirk_repairs": {name: n}}; reasons never
    /// seen are left out. Mnemonics are lower case ("clac", "popcnt", "int3").
    pub fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let exits = PyDict::new(py);
        for (slot, &n) in self.exits.iter().enumerate() {
            if n != 0 {
                exits.set_item(EXIT_NAMES.get(slot).copied().unwrap_or("other"), n)?;
            }
        }
        let pio = PyDict::new(py);
        for (base, n) in sorted(&self.pio) {
            pio.set_item(base, n)?;
        }
        let mmio = PyDict::new(py);
        for (base, n) in sorted(&self.mmio) {
            mmio.set_item(base, n)?;
        }
        let dict = PyDict::new(py);
        dict.set_item("exits", exits)?;
        dict.set_item("pio", pio)?;
        dict.set_item("mmio", mmio)?;
        dict.set_item("unmapped_pio", self.unmapped_pio)?;
        dict.set_item("unmapped_mmio", self.unmapped_mmio)?;
        dict.set_item("lint1_nmi", self.lint1_nmi)?;
        let mut completions: Vec<(String, u64)> = self
            .completions
            .iter()
            .map(|(mnemonic, n)| (mnemonic_name(*mnemonic), *n))
            .collect();
        completions.sort();
        let completions_dict = PyDict::new(py);
        for (name, n) in completions {
            completions_dict.set_item(name, n)?;
        }
        dict.set_item("completions", completions_dict)?;
        dict.set_item(
            "emulation_exceptions",
            named(py, &self.emulation_exceptions)?,
        )?;
        dict.set_item("quirk_repairs", named(py, &self.quirk_repairs)?)?;
        Ok(dict)
    }
}

/// The lower-case name of a mnemonic, as Intel syntax spells it ("int3", "xsaveopt").
pub fn mnemonic_name(mnemonic: Mnemonic) -> String {
    format!("{mnemonic:?}").to_lowercase()
}

fn named<'py>(py: Python<'py>, map: &HashMap<&'static str, u64>) -> PyResult<Bound<'py, PyDict>> {
    let mut pairs: Vec<(&str, u64)> = map.iter().map(|(k, v)| (*k, *v)).collect();
    pairs.sort_unstable();
    let dict = PyDict::new(py);
    for (name, n) in pairs {
        dict.set_item(name, n)?;
    }
    Ok(dict)
}

fn sorted(map: &HashMap<u64, u64>) -> Vec<(u64, u64)> {
    let mut pairs: Vec<(u64, u64)> = map.iter().map(|(k, v)| (*k, *v)).collect();
    pairs.sort_unstable();
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kvm_numbering() {
        assert_eq!(exit_name(kvm_bindings::KVM_EXIT_IO), "io");
        assert_eq!(exit_name(kvm_bindings::KVM_EXIT_MMIO), "mmio");
        assert_eq!(
            exit_name(kvm_bindings::KVM_EXIT_IRQ_WINDOW_OPEN),
            "irq_window_open"
        );
        assert_eq!(exit_name(kvm_bindings::KVM_EXIT_INTR), "intr");
        assert_eq!(exit_name(kvm_bindings::KVM_EXIT_IOAPIC_EOI), "ioapic_eoi");
        assert_eq!(
            exit_name(kvm_bindings::KVM_EXIT_SYSTEM_EVENT),
            "system_event"
        );
        assert_eq!(
            exit_name(kvm_bindings::KVM_EXIT_MEMORY_FAULT),
            "memory_fault"
        );
        assert_eq!(exit_name(1000), "other");
    }

    #[test]
    fn sums_add_up() {
        let mut a = Counters::default();
        a.count_exit(kvm_bindings::KVM_EXIT_IO);
        a.count_pio(Some(0x80));
        a.count_pio(None);
        let mut b = Counters::default();
        b.count_exit(kvm_bindings::KVM_EXIT_IO);
        b.count_exit(999);
        b.count_pio(Some(0x80));
        b.count_mmio(Some(0xfee0_0000));
        a.add(&b);
        assert_eq!(a.exits[exit_slot(kvm_bindings::KVM_EXIT_IO)], 2);
        assert_eq!(a.exits[EXIT_NAMES.len()], 1);
        assert_eq!(a.pio[&0x80], 2);
        assert_eq!(a.mmio[&0xfee0_0000], 1);
        assert_eq!(a.unmapped_pio, 1);
    }
}
