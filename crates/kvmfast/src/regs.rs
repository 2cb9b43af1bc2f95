//! vCPU state structures as Python dicts, and partial updates from dicts.
//!
//! Every `set_*` takes a dict of the fields to change: the others keep the values the
//! vCPU has (the caller reads, the dict patches, the whole structure is written back).

use kvm_bindings::{
    kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events,
    kvm_vcpu_events__bindgen_ty_1, kvm_vcpu_events__bindgen_ty_2, kvm_vcpu_events__bindgen_ty_3,
    kvm_vcpu_events__bindgen_ty_4, kvm_vcpu_events__bindgen_ty_5,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

/// (function, index, flags, eax, ebx, ecx, edx), as Python sees a CPUID entry.
pub type CpuidTuple = (u32, u32, u32, u32, u32, u32, u32);

/// Builds a dict of the named integer fields of a struct.
macro_rules! fields_to_dict {
    ($py:expr, $source:expr, { $($name:literal => $field:ident),* $(,)? }) => {{
        let dict = PyDict::new($py);
        $( dict.set_item($name, $source.$field)?; )*
        dict
    }};
}

/// Applies a dict of named integer fields to a struct; unknown names are a ValueError.
macro_rules! dict_to_fields {
    ($dict:expr, $target:expr, $what:expr, { $($name:literal => $field:ident),* $(,)? }) => {{
        for (key, value) in $dict.iter() {
            let key: String = key.extract()?;
            match key.as_str() {
                $( $name => $target.$field = value.extract()?, )*
                other => return Err(unknown_field($what, other)),
            }
        }
    }};
}

fn unknown_field(what: &str, name: &str) -> PyErr {
    PyValueError::new_err(format!("{what} has no field {name:?}"))
}

pub fn regs_to_dict<'py>(py: Python<'py>, regs: &kvm_regs) -> PyResult<Bound<'py, PyDict>> {
    Ok(fields_to_dict!(py, regs, {
        "rax" => rax, "rbx" => rbx, "rcx" => rcx, "rdx" => rdx, "rsi" => rsi, "rdi" => rdi,
        "rsp" => rsp, "rbp" => rbp, "r8" => r8, "r9" => r9, "r10" => r10, "r11" => r11,
        "r12" => r12, "r13" => r13, "r14" => r14, "r15" => r15, "rip" => rip,
        "rflags" => rflags,
    }))
}

pub fn update_regs(regs: &mut kvm_regs, dict: &Bound<'_, PyDict>) -> PyResult<()> {
    dict_to_fields!(dict, regs, "regs", {
        "rax" => rax, "rbx" => rbx, "rcx" => rcx, "rdx" => rdx, "rsi" => rsi, "rdi" => rdi,
        "rsp" => rsp, "rbp" => rbp, "r8" => r8, "r9" => r9, "r10" => r10, "r11" => r11,
        "r12" => r12, "r13" => r13, "r14" => r14, "r15" => r15, "rip" => rip,
        "rflags" => rflags,
    });
    Ok(())
}

fn segment_to_dict<'py>(py: Python<'py>, segment: &kvm_segment) -> PyResult<Bound<'py, PyDict>> {
    Ok(fields_to_dict!(py, segment, {
        "base" => base, "limit" => limit, "selector" => selector, "type" => type_,
        "present" => present, "dpl" => dpl, "db" => db, "s" => s, "l" => l, "g" => g,
        "avl" => avl, "unusable" => unusable,
    }))
}

fn update_segment(segment: &mut kvm_segment, dict: &Bound<'_, PyDict>) -> PyResult<()> {
    dict_to_fields!(dict, segment, "a segment", {
        "base" => base, "limit" => limit, "selector" => selector, "type" => type_,
        "present" => present, "dpl" => dpl, "db" => db, "s" => s, "l" => l, "g" => g,
        "avl" => avl, "unusable" => unusable,
    });
    Ok(())
}

fn dtable_to_dict<'py>(py: Python<'py>, table: &kvm_dtable) -> PyResult<Bound<'py, PyDict>> {
    Ok(fields_to_dict!(py, table, { "base" => base, "limit" => limit }))
}

fn update_dtable(table: &mut kvm_dtable, dict: &Bound<'_, PyDict>) -> PyResult<()> {
    dict_to_fields!(dict, table, "a descriptor table", { "base" => base, "limit" => limit });
    Ok(())
}

pub fn sregs_to_dict<'py>(py: Python<'py>, sregs: &kvm_sregs) -> PyResult<Bound<'py, PyDict>> {
    let dict = fields_to_dict!(py, sregs, {
        "cr0" => cr0, "cr2" => cr2, "cr3" => cr3, "cr4" => cr4, "cr8" => cr8,
        "efer" => efer, "apic_base" => apic_base,
    });
    for (name, segment) in segments(sregs) {
        dict.set_item(name, segment_to_dict(py, segment)?)?;
    }
    dict.set_item("gdt", dtable_to_dict(py, &sregs.gdt)?)?;
    dict.set_item("idt", dtable_to_dict(py, &sregs.idt)?)?;
    dict.set_item("interrupt_bitmap", sregs.interrupt_bitmap.to_vec())?;
    Ok(dict)
}

fn segments(sregs: &kvm_sregs) -> [(&'static str, &kvm_segment); 8] {
    [
        ("cs", &sregs.cs),
        ("ds", &sregs.ds),
        ("es", &sregs.es),
        ("fs", &sregs.fs),
        ("gs", &sregs.gs),
        ("ss", &sregs.ss),
        ("tr", &sregs.tr),
        ("ldt", &sregs.ldt),
    ]
}

pub fn update_sregs(sregs: &mut kvm_sregs, dict: &Bound<'_, PyDict>) -> PyResult<()> {
    for (key, value) in dict.iter() {
        let key: String = key.extract()?;
        let segment = match key.as_str() {
            "cs" => Some(&mut sregs.cs),
            "ds" => Some(&mut sregs.ds),
            "es" => Some(&mut sregs.es),
            "fs" => Some(&mut sregs.fs),
            "gs" => Some(&mut sregs.gs),
            "ss" => Some(&mut sregs.ss),
            "tr" => Some(&mut sregs.tr),
            "ldt" => Some(&mut sregs.ldt),
            _ => None,
        };
        if let Some(segment) = segment {
            update_segment(segment, value.cast::<PyDict>()?)?;
            continue;
        }
        match key.as_str() {
            "gdt" => update_dtable(&mut sregs.gdt, value.cast::<PyDict>()?)?,
            "idt" => update_dtable(&mut sregs.idt, value.cast::<PyDict>()?)?,
            "cr0" => sregs.cr0 = value.extract()?,
            "cr2" => sregs.cr2 = value.extract()?,
            "cr3" => sregs.cr3 = value.extract()?,
            "cr4" => sregs.cr4 = value.extract()?,
            "cr8" => sregs.cr8 = value.extract()?,
            "efer" => sregs.efer = value.extract()?,
            "apic_base" => sregs.apic_base = value.extract()?,
            "interrupt_bitmap" => sregs.interrupt_bitmap = value.extract()?,
            other => return Err(unknown_field("sregs", other)),
        }
    }
    Ok(())
}

pub fn fpu_to_dict<'py>(py: Python<'py>, fpu: &kvm_fpu) -> PyResult<Bound<'py, PyDict>> {
    let dict = fields_to_dict!(py, fpu, {
        "fcw" => fcw, "fsw" => fsw, "ftwx" => ftwx, "last_opcode" => last_opcode,
        "last_ip" => last_ip, "last_dp" => last_dp, "mxcsr" => mxcsr,
    });
    let registers = |rows: &[[u8; 16]]| -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, rows.iter().map(|row| PyBytes::new(py, row)))
    };
    dict.set_item("fpr", registers(&fpu.fpr)?)?;
    dict.set_item("xmm", registers(&fpu.xmm)?)?;
    Ok(dict)
}

fn extract_rows<const N: usize>(value: &Bound<'_, PyAny>, what: &str) -> PyResult<[[u8; 16]; N]> {
    let rows: Vec<Vec<u8>> = value.extract()?;
    if rows.len() != N || rows.iter().any(|row| row.len() != 16) {
        return Err(PyValueError::new_err(format!(
            "{what} must be {N} values of 16 bytes"
        )));
    }
    let mut out = [[0u8; 16]; N];
    for (slot, row) in out.iter_mut().zip(rows) {
        slot.copy_from_slice(&row);
    }
    Ok(out)
}

pub fn update_fpu(fpu: &mut kvm_fpu, dict: &Bound<'_, PyDict>) -> PyResult<()> {
    for (key, value) in dict.iter() {
        let key: String = key.extract()?;
        match key.as_str() {
            "fpr" => fpu.fpr = extract_rows(&value, "fpr")?,
            "xmm" => fpu.xmm = extract_rows(&value, "xmm")?,
            "fcw" => fpu.fcw = value.extract()?,
            "fsw" => fpu.fsw = value.extract()?,
            "ftwx" => fpu.ftwx = value.extract()?,
            "last_opcode" => fpu.last_opcode = value.extract()?,
            "last_ip" => fpu.last_ip = value.extract()?,
            "last_dp" => fpu.last_dp = value.extract()?,
            "mxcsr" => fpu.mxcsr = value.extract()?,
            other => return Err(unknown_field("fpu", other)),
        }
    }
    Ok(())
}

fn exception_fields<'py>(
    py: Python<'py>,
    e: &kvm_vcpu_events__bindgen_ty_1,
) -> PyResult<Bound<'py, PyDict>> {
    Ok(fields_to_dict!(py, e, {
        "injected" => injected, "nr" => nr, "has_error_code" => has_error_code,
        "pending" => pending, "error_code" => error_code,
    }))
}

fn interrupt_fields<'py>(
    py: Python<'py>,
    i: &kvm_vcpu_events__bindgen_ty_2,
) -> PyResult<Bound<'py, PyDict>> {
    Ok(fields_to_dict!(py, i, {
        "injected" => injected, "nr" => nr, "soft" => soft, "shadow" => shadow,
    }))
}

fn nmi_fields<'py>(
    py: Python<'py>,
    n: &kvm_vcpu_events__bindgen_ty_3,
) -> PyResult<Bound<'py, PyDict>> {
    Ok(fields_to_dict!(py, n, { "injected" => injected, "pending" => pending, "masked" => masked }))
}

fn smi_fields<'py>(
    py: Python<'py>,
    s: &kvm_vcpu_events__bindgen_ty_4,
) -> PyResult<Bound<'py, PyDict>> {
    Ok(fields_to_dict!(py, s, {
        "smm" => smm, "pending" => pending, "smm_inside_nmi" => smm_inside_nmi,
        "latched_init" => latched_init,
    }))
}

fn triple_fault_fields<'py>(
    py: Python<'py>,
    t: &kvm_vcpu_events__bindgen_ty_5,
) -> PyResult<Bound<'py, PyDict>> {
    Ok(fields_to_dict!(py, t, { "pending" => pending }))
}

pub fn events_to_dict<'py>(
    py: Python<'py>,
    events: &kvm_vcpu_events,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = fields_to_dict!(py, events, {
        "sipi_vector" => sipi_vector, "flags" => flags,
        "exception_has_payload" => exception_has_payload,
        "exception_payload" => exception_payload,
    });
    dict.set_item("exception", exception_fields(py, &events.exception)?)?;
    dict.set_item("interrupt", interrupt_fields(py, &events.interrupt)?)?;
    dict.set_item("nmi", nmi_fields(py, &events.nmi)?)?;
    dict.set_item("smi", smi_fields(py, &events.smi)?)?;
    dict.set_item(
        "triple_fault",
        triple_fault_fields(py, &events.triple_fault)?,
    )?;
    Ok(dict)
}

pub fn update_events(events: &mut kvm_vcpu_events, dict: &Bound<'_, PyDict>) -> PyResult<()> {
    for (key, value) in dict.iter() {
        let key: String = key.extract()?;
        match key.as_str() {
            "exception" => {
                dict_to_fields!(value.cast::<PyDict>()?, events.exception, "exception", {
                    "injected" => injected, "nr" => nr, "has_error_code" => has_error_code,
                    "pending" => pending, "error_code" => error_code,
                })
            }
            "interrupt" => {
                dict_to_fields!(value.cast::<PyDict>()?, events.interrupt, "interrupt", {
                    "injected" => injected, "nr" => nr, "soft" => soft, "shadow" => shadow,
                })
            }
            "nmi" => dict_to_fields!(value.cast::<PyDict>()?, events.nmi, "nmi", {
                "injected" => injected, "pending" => pending, "masked" => masked,
            }),
            "smi" => dict_to_fields!(value.cast::<PyDict>()?, events.smi, "smi", {
                "smm" => smm, "pending" => pending, "smm_inside_nmi" => smm_inside_nmi,
                "latched_init" => latched_init,
            }),
            "triple_fault" => dict_to_fields!(value.cast::<PyDict>()?, events.triple_fault,
                "triple_fault", { "pending" => pending }),
            "sipi_vector" => events.sipi_vector = value.extract()?,
            "flags" => events.flags = value.extract()?,
            "exception_has_payload" => events.exception_has_payload = value.extract()?,
            "exception_payload" => events.exception_payload = value.extract()?,
            other => return Err(unknown_field("vcpu events", other)),
        }
    }
    Ok(())
}
