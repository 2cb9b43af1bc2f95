"""The PIIX/ICH reset control register (I/O port 0xCF9 on those chips; the platform places it).

References: Intel 82371AB PIIX4 datasheet (290562-001), "RC—Reset Control Register"
(I/O 0CF9h): bit 1 SRST/SYS_RST selects a hard (1) or soft (0) reset, bit 2 RCPU/RST_CPU
starts that reset when it goes from 0 to 1. Intel ICH datasheets ("RST_CNT—Reset
Control Register") add bit 3 FULL_RST (a power cycle). ACPI 6.5 §4.8.3.6 "Reset
Register": the FADT's RESET_REG names this port, with RESET_VALUE
:attr:`ResetPort.RESET_VALUE` (0x06 = SYS_RST | RST_CPU, a hard reset).

Behaviour:

* A write of a byte with bit 2 set calls ``on_reset()``, whether bit 1 was set by an
  earlier write or by the same one, and whatever bits 1 and 3 say: the VMM has one kind
  of reset, a full one, which covers the soft (INIT) and hard kinds. The reset takes
  effect at once, so RST_CPU never reads back 1 and every write with bit 2 set is a
  0→1 transition.
* Reads return bits 1 (SYS_RST) and 3 (FULL_RST) of the last write; the other bits read
  0. The register keeps its value across the reset it requests, as FULL_RST does on the
  ICH (it is reset only by RSMRST#); the VMM may call :meth:`ResetPort.restore` with a
  fresh state if it wants otherwise.
* The port is 8 bits wide: a wider access acts on its first byte; the other bytes read
  0xFF and ignore writes (undecoded). Accesses at offsets other than 0 are undecoded.

Thread-safety: a lock guards the stored value; ``on_reset`` is called with no lock held,
so it may do anything, including tearing the VM down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from kvm_devices.snapshot import Mask, Snapshotting, detached, state_from_data

SYS_RST = 1 << 1
RST_CPU = 1 << 2
FULL_RST = 1 << 3
READABLE_BITS = SYS_RST | FULL_RST


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1 if size > 0 else 0


@dataclass
class ResetPortState:
    """The readable bits (SYS_RST, FULL_RST) of the last value written."""

    value: Annotated[int, Mask(READABLE_BITS)] = 0


class ResetPort(Snapshotting[ResetPortState]):
    """Reset control register: writing bit 2 (RST_CPU) resets the machine."""

    SIZE = 1
    RESET_VALUE = SYS_RST | RST_CPU
    """What the FADT's RESET_VALUE holds for RESET_REG = this port (0x06, a hard reset)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._state = ResetPortState()

    def read(self, offset: int, size: int) -> int:
        if offset != 0 or not 1 <= size <= 8:
            return _all_ones(size)
        with self._lock:
            value = self._state.value
        return (_all_ones(size) & ~0xFF) | value

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or not 1 <= size <= 8:
            return
        byte = value & 0xFF
        with self._lock:
            self._state.value = byte & READABLE_BITS
        if byte & RST_CPU:
            self._on_reset()

    def save_state(self) -> ResetPortState:
        with self._lock:
            return detached(self._state)

    def check_state(self, data: object) -> ResetPortState:
        return state_from_data(ResetPortState, data, "reset port")

    def restore_state(self, state: ResetPortState) -> None:
        with self._lock:
            self._state = detached(state)
