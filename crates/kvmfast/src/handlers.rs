//! What can own an address range: a Python device, or a Rust-native sink that answers
//! without taking the GIL.

use std::sync::{Arc, Mutex};

use pyo3::PyTraverseError;
use pyo3::exceptions::PyTypeError;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyInt, PyTuple};

/// Reads all-ones, drops writes: a bus with nothing on it, without Python.
#[pyclass(frozen, module = "kvmfast")]
#[derive(Debug, Default)]
pub struct NullSink;

#[pymethods]
impl NullSink {
    #[new]
    fn new() -> Self {
        Self
    }

    fn __repr__(&self) -> &'static str {
        "NullSink()"
    }
}

/// A write ends the vCPU's run() with Exit("device_exit", value); reads are all-ones.
#[pyclass(frozen, module = "kvmfast")]
#[derive(Debug, Default)]
pub struct ExitSink;

#[pymethods]
impl ExitSink {
    #[new]
    fn new() -> Self {
        Self
    }

    fn __repr__(&self) -> &'static str {
        "ExitSink()"
    }
}

/// A Python object with read(offset, size) -> int and write(offset, size, value).
#[derive(Debug)]
pub struct PyDevice {
    read: Py<PyAny>,
    write: Py<PyAny>,
    read_args: ArgsTuple,
    write_args: ArgsTuple,
}

impl PyDevice {
    /// Calls device.read(offset, size); the answer is reduced to `size` bytes.
    pub fn read(&self, py: Python<'_>, offset: u64, size: usize) -> PyResult<u64> {
        let answer = self
            .read_args
            .call(py, &self.read, &[offset, size as u64])?;
        Ok(truncate(as_u64(&answer)?, size))
    }

    pub fn write(&self, py: Python<'_>, offset: u64, size: usize, value: u64) -> PyResult<()> {
        self.write_args
            .call(py, &self.write, &[offset, size as u64, value])
            .map(drop)
    }

    /// Reports the Python objects held, for the garbage collector.
    pub fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.read)?;
        visit.call(&self.write)
    }
}

/// The argument tuple of one method, refilled in place for the next call when nothing
/// else holds it. The stable ABI (abi3) has no vectorcall before Python 3.12, so each
/// call takes a tuple; a new one per exit is an allocation, a GC-tracked object and a
/// share of the collections it triggers, about a fifth of a Python handler's own cost.
#[derive(Debug, Default)]
struct ArgsTuple(Mutex<Option<Py<PyTuple>>>);

impl ArgsTuple {
    fn call<'py>(
        &self,
        py: Python<'py>,
        method: &Py<PyAny>,
        args: &[u64],
    ) -> PyResult<Bound<'py, PyAny>> {
        // Another vCPU thread may be inside a call of the same method (its handler let
        // the GIL go): it then gets a tuple of its own.
        let mut cached = self.0.try_lock().ok();
        let reused = cached
            .as_mut()
            .and_then(|slot| slot.take())
            .map(|tuple| tuple.into_bound(py))
            // SAFETY: reading the reference count of a live object while holding the GIL.
            .filter(|tuple| unsafe { pyo3::ffi::Py_REFCNT(tuple.as_ptr()) } == 1);
        let tuple = match reused {
            Some(tuple) => {
                for (index, value) in args.iter().enumerate() {
                    let item = value.into_pyobject(py)?.into_ptr();
                    // SAFETY: the tuple has args.len() slots and this is its only
                    // reference (refcount 1), so no Python code can see it change, as
                    // PyTuple_SetItem requires; it steals `item` and releases the old
                    // item.
                    let status =
                        unsafe { pyo3::ffi::PyTuple_SetItem(tuple.as_ptr(), index as isize, item) };
                    if status != 0 {
                        return Err(PyErr::fetch(py));
                    }
                }
                tuple
            }
            None => PyTuple::new(py, args)?,
        };
        let answer = method.bind(py).call1(&tuple);
        if let Some(slot) = cached.as_mut() {
            **slot = Some(tuple.unbind());
        }
        answer
    }
}

/// An int of any sign or width as its low 64 bits (two's complement), as a bus would
/// latch it.
fn as_u64(value: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(unsigned) = value.extract::<u64>() {
        return Ok(unsigned);
    }
    if let Ok(signed) = value.extract::<i64>() {
        return Ok(signed as u64);
    }
    let int = value.cast::<PyInt>().map_err(|_| {
        PyTypeError::new_err(format!(
            "a device read must return an int, not {}",
            value
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    int.call_method1("__and__", (u64::MAX,))?.extract::<u64>()
}

/// The low `size` bytes of `value`.
pub fn truncate(value: u64, size: usize) -> u64 {
    if size >= 8 {
        value
    } else {
        value & ((1u64 << (size * 8)) - 1)
    }
}

/// All-ones of `size` bytes: what an undecoded bus returns.
pub fn all_ones(size: usize) -> u64 {
    truncate(u64::MAX, size)
}

/// The owner of a range, as the run loop sees it.
#[derive(Debug, Clone)]
pub enum Handler {
    Null,
    Exit,
    Python(Arc<PyDevice>),
}

impl Handler {
    /// Accepts NullSink, ExitSink or any object with callable read and write.
    pub fn from_object(object: &Bound<'_, PyAny>) -> PyResult<Self> {
        if object.is_instance_of::<NullSink>() {
            return Ok(Self::Null);
        }
        if object.is_instance_of::<ExitSink>() {
            return Ok(Self::Exit);
        }
        let method = |name: &str| -> PyResult<Py<PyAny>> {
            let attribute = object.getattr(name).map_err(|_| {
                PyTypeError::new_err(format!(
                    "a handler must be NullSink, ExitSink or have read() and write(); {} has \
                     no {name}()",
                    object.repr().map(|r| r.to_string()).unwrap_or_default()
                ))
            })?;
            if !attribute.is_callable() {
                return Err(PyTypeError::new_err(format!(
                    "the handler's {name} is not callable"
                )));
            }
            Ok(attribute.unbind())
        };
        Ok(Self::Python(Arc::new(PyDevice {
            read: method("read")?,
            write: method("write")?,
            read_args: ArgsTuple::default(),
            write_args: ArgsTuple::default(),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_mask_to_their_bytes() {
        assert_eq!(truncate(0x1122_3344_5566_7788, 1), 0x88);
        assert_eq!(truncate(0x1122_3344_5566_7788, 2), 0x7788);
        assert_eq!(truncate(0x1122_3344_5566_7788, 4), 0x5566_7788);
        assert_eq!(truncate(0x1122_3344_5566_7788, 8), 0x1122_3344_5566_7788);
        assert_eq!(all_ones(1), 0xff);
        assert_eq!(all_ones(4), 0xffff_ffff);
        assert_eq!(all_ones(8), u64::MAX);
    }
}
