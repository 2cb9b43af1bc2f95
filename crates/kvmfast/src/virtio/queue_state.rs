//! One queue's state as a snapshot keeps it (virtio-queue's QueueState, plus the used
//! index of the last interrupt decision), and its Python dict, checked key by key.

use std::fmt;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyInt};

/// The dict's keys, exactly.
pub const KEYS: [&str; 9] = [
    "ready",
    "size",
    "desc_table",
    "avail_ring",
    "used_ring",
    "next_avail",
    "next_used",
    "event_idx",
    "signalled_used",
];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueState {
    pub ready: bool,
    pub size: u64,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    /// next_used when the device last decided whether to interrupt (what virtio-queue
    /// keeps as next_used - num_added); None: unknown, the next decision interrupts.
    pub signalled_used: Option<u16>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum StateError {
    Count {
        given: usize,
        expected: usize,
    },
    MissingKey {
        queue: usize,
        key: &'static str,
    },
    ExtraKey {
        queue: usize,
        key: String,
    },
    Type {
        queue: usize,
        key: &'static str,
        expected: &'static str,
    },
    NotU16 {
        queue: usize,
        key: &'static str,
    },
    /// ready, size or a ring address differs from what activate() was given.
    Mismatch {
        queue: usize,
        key: &'static str,
    },
    /// The queue was served after activate(): restoring now would rewind it.
    AlreadyServed {
        queue: usize,
    },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count { given, expected } => {
                write!(
                    f,
                    "{given} queue states given, the device has {expected} queue(s)"
                )
            }
            Self::MissingKey { queue, key } => write!(f, "queue {queue}: no {key:?}"),
            Self::ExtraKey { queue, key } => write!(f, "queue {queue}: unknown key {key:?}"),
            Self::Type {
                queue,
                key,
                expected,
            } => write!(f, "queue {queue}: {key:?} must be {expected}"),
            Self::NotU16 { queue, key } => {
                write!(f, "queue {queue}: {key:?} must be an index of 0..65535")
            }
            Self::Mismatch { queue, key } => write!(
                f,
                "queue {queue}: {key:?} differs from what activate() was given"
            ),
            Self::AlreadyServed { queue } => write!(
                f,
                "queue {queue} was served since activate(): restore before the device serves \
                 anything (pause() it before activate())"
            ),
        }
    }
}

impl QueueState {
    pub fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("ready", self.ready)?;
        dict.set_item("size", self.size)?;
        dict.set_item("desc_table", self.desc_table)?;
        dict.set_item("avail_ring", self.avail_ring)?;
        dict.set_item("used_ring", self.used_ring)?;
        dict.set_item("next_avail", self.next_avail)?;
        dict.set_item("next_used", self.next_used)?;
        dict.set_item("event_idx", self.event_idx)?;
        dict.set_item("signalled_used", self.signalled_used)?;
        Ok(dict)
    }

    /// The state of queue `queue` from its dict: exactly KEYS, bools as bools, integers
    /// as ints (not bools), indices u16.
    pub fn from_dict(queue: usize, dict: &Bound<'_, PyAny>) -> Result<Self, StateError> {
        let dict = dict.cast::<PyDict>().map_err(|_| StateError::Type {
            queue,
            key: "state",
            expected: "a dict",
        })?;
        for key in dict.keys() {
            let name: String = key.extract().unwrap_or_else(|_| format!("{key}"));
            if !KEYS.contains(&name.as_str()) {
                return Err(StateError::ExtraKey { queue, key: name });
            }
        }
        let get = |key: &'static str| {
            dict.get_item(key)
                .ok()
                .flatten()
                .ok_or(StateError::MissingKey { queue, key })
        };
        let boolean = |key: &'static str| -> Result<bool, StateError> {
            let value = get(key)?;
            value
                .cast::<PyBool>()
                .map(|b| b.is_true())
                .map_err(|_| StateError::Type {
                    queue,
                    key,
                    expected: "a bool",
                })
        };
        let integer = |value: &Bound<'_, PyAny>, key: &'static str| -> Result<u64, StateError> {
            if value.is_instance_of::<PyBool>() || !value.is_instance_of::<PyInt>() {
                return Err(StateError::Type {
                    queue,
                    key,
                    expected: "an int",
                });
            }
            value.extract::<u64>().map_err(|_| StateError::Type {
                queue,
                key,
                expected: "an int of 0..2^64",
            })
        };
        let index = |value: &Bound<'_, PyAny>, key: &'static str| -> Result<u16, StateError> {
            u16::try_from(integer(value, key)?).map_err(|_| StateError::NotU16 { queue, key })
        };
        let signalled = get("signalled_used")?;
        Ok(Self {
            ready: boolean("ready")?,
            size: integer(&get("size")?, "size")?,
            desc_table: integer(&get("desc_table")?, "desc_table")?,
            avail_ring: integer(&get("avail_ring")?, "avail_ring")?,
            used_ring: integer(&get("used_ring")?, "used_ring")?,
            next_avail: index(&get("next_avail")?, "next_avail")?,
            next_used: index(&get("next_used")?, "next_used")?,
            event_idx: boolean("event_idx")?,
            signalled_used: if signalled.is_none() {
                None
            } else {
                Some(index(&signalled, "signalled_used")?)
            },
        })
    }

    /// The first of ready, size and the ring addresses where `self` and `active` differ.
    pub fn mismatch(&self, active: &Self) -> Option<&'static str> {
        [
            ("ready", self.ready == active.ready),
            ("size", self.size == active.size),
            ("desc_table", self.desc_table == active.desc_table),
            ("avail_ring", self.avail_ring == active.avail_ring),
            ("used_ring", self.used_ring == active.used_ring),
        ]
        .into_iter()
        .find(|(_, same)| !same)
        .map(|(key, _)| key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> QueueState {
        QueueState {
            ready: true,
            size: 16,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x2800,
            next_avail: 65535,
            next_used: 7,
            event_idx: true,
            signalled_used: Some(5),
        }
    }

    #[test]
    fn mismatch_names_the_first_differing_field() {
        let active = sample();
        let mut other = sample();
        other.next_avail = 3;
        other.signalled_used = None;
        assert_eq!(other.mismatch(&active), None);
        other.used_ring = 0x3000;
        assert_eq!(other.mismatch(&active), Some("used_ring"));
        other.size = 8;
        assert_eq!(other.mismatch(&active), Some("size"));
    }
}
