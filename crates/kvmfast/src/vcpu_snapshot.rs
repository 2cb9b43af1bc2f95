//! The vCPU state a snapshot needs beyond the setters of vcpu.rs: every MSR KVM will
//! read, the debug registers as a dict, and CPUID read back.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_debugregs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use vmm_sys_util::errno;

use crate::regs::CpuidTuple;

/// KVM_GET_MSRS refuses nmsrs >= MAX_IO_MSRS (256, arch/x86/kvm/x86.c msr_io): asked
/// in batches below that.
const MSR_BATCH: usize = 128;

#[derive(Debug, PartialEq, Eq)]
pub enum MsrReadError {
    /// The ioctl itself failed (not one MSR refused).
    Ioctl(errno::Error),
    /// The FAM wrapper refused the batch (never expected below MSR_BATCH).
    Batch,
}

/// Reads every MSR of `indices` that `read` (KVM_GET_MSRS) accepts, in order.
///
/// KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it read
/// (api.rst 4.18): that one is left out and the read goes on after it.
pub fn read_readable_msrs(
    indices: &[u32],
    mut read: impl FnMut(&mut Msrs) -> Result<usize, errno::Error>,
) -> Result<Vec<(u32, u64)>, MsrReadError> {
    let mut values = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| MsrReadError::Batch)?;
        let count = read(&mut msrs)
            .map_err(MsrReadError::Ioctl)?
            .min(batch.len());
        values.extend(msrs.as_slice()[..count].iter().map(|e| (e.index, e.data)));
        // The entry at `count` (if any) is the refused one.
        rest = &rest[(count + 1).min(batch.len())..];
    }
    Ok(values)
}

pub fn debugregs_to_dict<'py>(
    py: Python<'py>,
    regs: &kvm_debugregs,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("db", regs.db.to_vec())?;
    dict.set_item("dr6", regs.dr6)?;
    dict.set_item("dr7", regs.dr7)?;
    dict.set_item("flags", regs.flags)?;
    Ok(dict)
}

/// Applies the keys of `dict` (db, dr6, dr7, flags) to `regs`; the others keep theirs.
pub fn update_debugregs(regs: &mut kvm_debugregs, dict: &Bound<'_, PyDict>) -> PyResult<()> {
    for (key, value) in dict.iter() {
        let key: String = key.extract()?;
        match key.as_str() {
            "db" => {
                let db: Vec<u64> = value.extract()?;
                regs.db = db.try_into().map_err(|db: Vec<u64>| {
                    PyValueError::new_err(format!("db must be 4 values, not {}", db.len()))
                })?;
            }
            "dr6" => regs.dr6 = value.extract()?,
            "dr7" => regs.dr7 = value.extract()?,
            "flags" => regs.flags = value.extract()?,
            other => {
                return Err(PyValueError::new_err(format!(
                    "debug registers have no field {other:?}"
                )));
            }
        }
    }
    Ok(())
}

/// KVM_GET_CPUID2 as set_cpuid's tuples (empty before any KVM_SET_CPUID2).
pub fn get_cpuid(fd: &VcpuFd) -> Result<Vec<CpuidTuple>, errno::Error> {
    let cpuid: CpuId = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)?;
    Ok(cpuid
        .as_slice()
        .iter()
        .map(|e| (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx))
        .collect())
}

/// KVM_KVMCLOCK_CTRL: false when KVM answers EINVAL (the guest has no kvmclock page).
pub fn kvmclock_ctrl(fd: &VcpuFd) -> Result<bool, errno::Error> {
    match fd.kvmclock_ctrl() {
        Ok(()) => Ok(true),
        Err(err) if err.errno() == libc::EINVAL => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A KVM_GET_MSRS that refuses `refused` and fills value = index * 2 otherwise.
    fn fake_kvm(refused: &[u32]) -> impl FnMut(&mut Msrs) -> Result<usize, errno::Error> + '_ {
        move |msrs| {
            let mut count = 0;
            for entry in msrs.as_mut_slice() {
                if refused.contains(&entry.index) {
                    break;
                }
                entry.data = u64::from(entry.index) * 2;
                count += 1;
            }
            Ok(count)
        }
    }

    #[test]
    fn refused_msrs_are_left_out_and_the_rest_read() {
        let indices = [1, 2, 3, 4, 5];
        let values = read_readable_msrs(&indices, fake_kvm(&[2, 5])).unwrap();
        assert_eq!(values, vec![(1, 2), (3, 6), (4, 8)]);
        let values = read_readable_msrs(&indices, fake_kvm(&[1, 2, 3, 4, 5])).unwrap();
        assert!(values.is_empty());
    }

    #[test]
    fn long_lists_are_read_in_batches_below_kvms_limit() {
        let indices: Vec<u32> = (0..600).collect();
        let mut sizes = Vec::new();
        let mut inner = fake_kvm(&[130]);
        let values = read_readable_msrs(&indices, |msrs| {
            sizes.push(msrs.as_slice().len());
            inner(msrs)
        })
        .unwrap();
        assert_eq!(values.len(), 599);
        assert!(
            values
                .iter()
                .all(|&(i, v)| i != 130 && v == u64::from(i) * 2)
        );
        assert!(sizes.iter().all(|&n| n < 256));
    }

    #[test]
    fn an_ioctl_failure_is_an_error() {
        let failing = |_: &mut Msrs| Err(errno::Error::new(libc::EBADF));
        assert_eq!(
            read_readable_msrs(&[1], failing),
            Err(MsrReadError::Ioctl(errno::Error::new(libc::EBADF)))
        );
    }
}
