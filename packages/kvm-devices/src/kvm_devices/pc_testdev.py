"""QEMU's ``pc-testdev`` (hw/misc/pc-testdev.c), the helper device of kvm-unit-tests.

It has five windows, each exposed as its own :class:`~kvm_devices.interfaces.Device`:

=====================  ===================  =============================================
view                   conventional place   what it does
=====================  ===================  =============================================
``scratch_port``       I/O 0xE0, 4 bytes    a 32-bit scratch register, any width
``flush_port``         I/O 0xE4, 4 bytes    a 32-bit write of an address flushes its page
``scratch_byte_port``  I/O 0xE8, 4 bytes    the same scratch register (QEMU splits every
                                            access to it into byte accesses)
``irq_ports``          I/O 0x2000, 24 bytes a byte write of ``v`` to ``0x2000 + n`` sets
                                            interrupt line ``n`` to ``bool(v)``
``iomem``              MMIO 0xFF000000,     64 KiB of scratch memory
                       64 KiB
=====================  ===================  =============================================

Access rules, as QEMU's memory core applies them to this device's regions:

* Every window is little-endian and byte-addressed. An access that runs past the end of
  its window acts on the bytes inside it; the bytes beyond are not this window's
  (QEMU clips the access at the region end): they read as all-ones and writes to them
  are dropped. Reads return what was last written at those bytes, whatever the widths
  of the write and the read.
* ``irq_ports`` accepts only 1-byte accesses (QEMU: ``valid.max_access_size = 1``);
  reads return 0 (QEMU's ``test_irq_line_read``). Wider accesses are rejected by QEMU's
  access check: writes are ignored and reads return all-ones, as undecoded ones.
* ``flush_port`` accepts only a 4-byte access at offset 0 (QEMU: ``valid`` sizes 4..4);
  reads return 0. A write calls ``flush_page(value & ~0xFFF)``: QEMU flushes the guest
  page that holds the written address (by ``mprotect``-ing its host mapping), which only
  the VMM can do.
* Interrupt line levels are remembered in the snapshot for inspection; restoring does
  not drive the lines again (the interrupt controllers snapshot their own input
  levels).

Thread-safety: one lock guards the state. ``set_irq`` is called after it is released, in
the order of the writes (:mod:`kvm_devices.outbox`), so that vCPUs racing on one line
leave it at the level of the last write; it may call back into this device.
``flush_page`` is called with no lock held.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from kvm_devices.outbox import Outbox
from kvm_devices.snapshot import Length, Snapshotting, bits, detached, state_from_data

SCRATCH_BYTES = 4
IRQ_LINES = 24
IOMEM_SIZE = 0x10000
PAGE_MASK = ~0xFFF & 0xFFFF_FFFF


@dataclass
class PcTestdevState:
    """Everything the guest can observe through the device."""

    scratch: Annotated[int, bits(32)] = 0
    """The 32-bit register behind 0xE0 and 0xE8."""
    irq_levels: Annotated[list[bool], Length(IRQ_LINES)] = field(
        default_factory=lambda: [False] * IRQ_LINES
    )
    """The last level written for each interrupt line."""
    iomem: Annotated[bytes, Length(IOMEM_SIZE)] = bytes(IOMEM_SIZE)
    """The 64 KiB MMIO scratch window (live in a bytearray; copied here by save())."""


class PcTestdev(Snapshotting[PcTestdevState]):
    """kvm-unit-tests' helper device; see the module documentation for its windows."""

    BASE_SCRATCH = 0xE0
    SCRATCH_SIZE = SCRATCH_BYTES
    BASE_FLUSH = 0xE4
    FLUSH_SIZE = 4
    BASE_SCRATCH_BYTE = 0xE8
    SCRATCH_BYTE_SIZE = SCRATCH_BYTES
    BASE_IRQ = 0x2000
    IRQ_SIZE = IRQ_LINES
    BASE_IOMEM = 0xFF00_0000
    IOMEM_SIZE = IOMEM_SIZE

    def __init__(
        self,
        set_irq: Callable[[int, bool], None],
        flush_page: Callable[[int], None] | None = None,
    ) -> None:
        self._set_irq = set_irq
        self._flush_page = flush_page
        self._lock = threading.Lock()
        self._outbox = Outbox(self._lock)
        self._state = PcTestdevState()
        self._iomem = bytearray(IOMEM_SIZE)
        self.scratch_port = _ScratchPort(self)
        self.scratch_byte_port = _ScratchPort(self)
        self.flush_port = _FlushPort(self)
        self.irq_ports = _IrqPorts(self)
        self.iomem = _IoMemory(self)

    # ------------------------------------------------------------------ scratch

    def _read_scratch(self, offset: int, size: int) -> int:
        with self._lock:
            raw = self._state.scratch.to_bytes(SCRATCH_BYTES, "little")
        return _read_bytes(raw, offset, size)

    def _write_scratch(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            raw = bytearray(self._state.scratch.to_bytes(SCRATCH_BYTES, "little"))
            _write_bytes(raw, offset, size, value)
            self._state.scratch = int.from_bytes(raw, "little")

    # -------------------------------------------------------------------- flush

    def _write_flush(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4 and self._flush_page is not None:
            self._flush_page(value & PAGE_MASK)

    # --------------------------------------------------------------------- irqs

    def _write_irq(self, offset: int, size: int, value: int) -> None:
        if size != 1 or not 0 <= offset < IRQ_LINES:
            return
        level = bool(value & 0xFF)
        with self._lock:
            self._state.irq_levels[offset] = level
            # Every write drives the line, as QEMU's qemu_set_irq does: a controller
            # that sees the same level twice ignores it.
            self._outbox.post(functools.partial(self._set_irq, offset, level))
        self._outbox.flush()

    # -------------------------------------------------------------------- iomem

    def _read_iomem(self, offset: int, size: int) -> int:
        with self._lock:
            return _read_bytes(self._iomem, offset, size)

    def _write_iomem(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            _write_bytes(self._iomem, offset, size, value)

    # ----------------------------------------------------------------- snapshot

    @property
    def irq_levels(self) -> list[bool]:
        """The last level written to each of the 24 interrupt lines."""
        with self._lock:
            return list(self._state.irq_levels)

    def save_state(self) -> PcTestdevState:
        with self._lock:
            return detached(dataclasses.replace(self._state, iomem=bytes(self._iomem)))

    def check_state(self, data: object) -> PcTestdevState:
        return state_from_data(PcTestdevState, data, "pc-testdev")

    def restore_state(self, state: PcTestdevState) -> None:
        with self._lock:
            self._state = detached(state)
            self._iomem = bytearray(state.iomem)


class _ScratchPort:
    def __init__(self, device: PcTestdev) -> None:
        self._device = device

    def read(self, offset: int, size: int) -> int:
        return self._device._read_scratch(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._device._write_scratch(offset, size, value)


class _FlushPort:
    def __init__(self, device: PcTestdev) -> None:
        self._device = device

    def read(self, offset: int, size: int) -> int:
        return 0 if offset == 0 and size == 4 else _all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._device._write_flush(offset, size, value)


class _IrqPorts:
    def __init__(self, device: PcTestdev) -> None:
        self._device = device

    def read(self, offset: int, size: int) -> int:
        return 0 if size == 1 and 0 <= offset < IRQ_LINES else _all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._device._write_irq(offset, size, value)


class _IoMemory:
    def __init__(self, device: PcTestdev) -> None:
        self._device = device

    def read(self, offset: int, size: int) -> int:
        return self._device._read_iomem(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._device._write_iomem(offset, size, value)


def _all_ones(size: int) -> int:
    return (1 << (8 * max(size, 0))) - 1


def _read_bytes(memory: bytes | bytearray, offset: int, size: int) -> int:
    """Little-endian read; bytes outside ``memory`` read as 0xFF (not this window's)."""
    value = 0
    for i in range(max(size, 0)):
        at = offset + i
        byte = memory[at] if 0 <= at < len(memory) else 0xFF
        value |= byte << (8 * i)
    return value


def _write_bytes(memory: bytearray, offset: int, size: int, value: int) -> None:
    """Little-endian write; bytes outside ``memory`` are dropped."""
    for i in range(max(size, 0)):
        at = offset + i
        if 0 <= at < len(memory):
            memory[at] = (value >> (8 * i)) & 0xFF
