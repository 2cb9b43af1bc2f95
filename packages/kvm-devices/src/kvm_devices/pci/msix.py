"""MSI-X: the capability, the vector table and the pending bit array of a PCI function.

References: PCI Local Bus Specification 3.0, §6.8.2 "MSI-X Capability and Table
Structures": §6.8.2.3 Message Control (table size N-1 in bits 10:0, Function Mask bit 14,
MSI-X Enable bit 15), §6.8.2.4/6.8.2.5 Table and PBA Offset/BIR, §6.8.2.6-6.8.2.9 the
16-byte table entry (Message Address, Message Upper Address, Message Data, Vector
Control with its Mask Bit 0), §6.8.2.10 the Pending Bits; §6.8.3.4 "Per-vector Masking
and Function Masking".

The table and PBA live in a memory BAR of the owner, which routes accesses at the offsets
it chose to :meth:`MsixTable.table_read`/``table_write``/``pba_read`` (offsets relative to
the table's and PBA's first byte). The message control register is this object's: it
is the :class:`~kvm_devices.pci.config_space.CapabilityHandler` of the capability
(:meth:`MsixTable.add_to`).

Behaviour:

* A vector is *effectively masked* when MSI-X is disabled, the function is masked, or the
  entry's mask bit is set. :meth:`MsixTable.signal` of an effectively masked vector sets
  its pending bit (a masked vector's event is held, §6.8.3.4), unless MSI-X is disabled:
  then the function may not use MSI-X at all (§6.8.2.3, it signals through INTx instead)
  and the signal is dropped and counted, as QEMU's ``msix_notify`` does. A pending vector
  that becomes effectively unmasked has its bit cleared and is fired once.
* The sink hears :meth:`MsixSink.vector_changed` for every change of a vector's address,
  data or effective mask, so that the VMM keeps the vector's MSI route (and irqfd) equal
  to the table; at construction every vector is masked with a zero message, and nothing
  is reported until something changes (:meth:`MsixTable.report_all` re-sends all).
* Table and PBA accesses must be aligned dwords or qwords (§6.8.2: "software must use
  aligned full DWORD or aligned full QWORD transactions"); others, and accesses beyond
  the table or PBA, read all ones and are ignored, counted in :class:`MsixCounters`.
  Message Address bits 1:0 and Vector Control bits 31:1 read 0; the PBA ignores writes.

Thread-safety: one lock guards the table. Sink calls are posted to the outbox and made
after the lock is released (docs/architecture.md, "Device locks"), so the sink may call
back in; a vector's ``vector_changed`` is always made before the ``fire`` it enables.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Annotated, Protocol

from kvm_devices.outbox import Outbox
from kvm_devices.pci.config_space import BAR_COUNT, PciConfigSpace
from kvm_devices.snapshot import (
    Mask,
    Snapshotting,
    StateError,
    bits,
    detached,
    state_from_data,
)

CAPABILITY_ID = 0x11
CAPABILITY_BODY_SIZE = 10  # message control, table offset/BIR, PBA offset/BIR
CONTROL_FUNCTION_MASK = 1 << 14
CONTROL_ENABLE = 1 << 15
MAX_VECTORS = 2048
ENTRY_SIZE = 16
VECTOR_CONTROL_MASK = 1
ADDRESS_BITS = 0xFFFF_FFFF_FFFF_FFFC  # bits 1:0 are hard-wired 0 (dword aligned)

_DWORD = 0xFFFF_FFFF


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1 if size > 0 else 0


class MsixSink(Protocol):
    """Where a function's MSI-X messages go (the VMM: KVM MSI routes and irqfds)."""

    def vector_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        """The vector's message or its effective mask changed."""

    def fire(self, vector: int) -> None:
        """Send the vector's message now."""


@dataclass
class MsixCounters:
    """What the guest or the owner got wrong, counted rather than raised."""

    bad_accesses: int = 0  # unaligned, not 4 or 8 bytes, or beyond the table or PBA
    dropped_signals: int = 0  # signal() with MSI-X disabled or of a vector out of range


@dataclass
class MsixState:
    """The message control bits and every entry; lists have one item per vector."""

    enabled: bool = False
    function_masked: bool = False
    addresses: list[Annotated[int, Mask(ADDRESS_BITS)]] = field(default_factory=list)
    data: list[Annotated[int, bits(32)]] = field(default_factory=list)
    masked: list[bool] = field(default_factory=list)
    pending: list[bool] = field(default_factory=list)

    def check_invariants(self) -> None:
        vectors = len(self.addresses)
        if not 1 <= vectors <= MAX_VECTORS:
            raise StateError("addresses", f"has {vectors} vectors, not 1..{MAX_VECTORS}")
        for name in ("data", "masked", "pending"):
            if len(getattr(self, name)) != vectors:
                raise StateError(name, f"must have one item per vector ({vectors})")
        for vector, pending in enumerate(self.pending):
            unmasked = self.enabled and not self.function_masked and not self.masked[vector]
            if pending and unmasked:
                raise StateError(f"pending[{vector}]", "pending on an unmasked vector")


class MsixTable(Snapshotting[MsixState]):
    """``vectors`` MSI-X vectors with their table and PBA in the owner's BARs."""

    def __init__(
        self,
        vectors: int,
        table_bar: int,
        table_offset: int,
        pba_bar: int,
        pba_offset: int,
        sink: MsixSink,
    ) -> None:
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X has 1..{MAX_VECTORS} vectors, not {vectors}")
        for name, bar, offset in (
            ("table", table_bar, table_offset),
            ("PBA", pba_bar, pba_offset),
        ):
            if not 0 <= bar < BAR_COUNT:
                raise ValueError(f"{name} BAR {bar} out of range 0..{BAR_COUNT - 1}")
            if offset % 8 or not 0 <= offset <= _DWORD:
                raise ValueError(f"{name} offset {offset:#x} is not a qword-aligned 32-bit value")
        self._vectors = vectors
        self._table_bar, self._table_offset = table_bar, table_offset
        self._pba_bar, self._pba_offset = pba_bar, pba_offset
        self._sink = sink
        self._lock = threading.Lock()
        self._outbox = Outbox(self._lock)
        self._state = self._reset_state(vectors)
        self._counters = MsixCounters()
        self._reported: list[tuple[int, int, bool]] = [
            self._message_locked(vector) for vector in range(vectors)
        ]

    @staticmethod
    def _reset_state(vectors: int) -> MsixState:
        # §6.8.2.9: every Mask Bit is 1 after reset.
        return MsixState(
            addresses=[0] * vectors,
            data=[0] * vectors,
            masked=[True] * vectors,
            pending=[False] * vectors,
        )

    @property
    def vectors(self) -> int:
        return self._vectors

    @property
    def table_size(self) -> int:
        return self._vectors * ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return (self._vectors + 63) // 64 * 8

    @property
    def enabled(self) -> bool:
        with self._lock:
            return self._state.enabled

    @property
    def function_masked(self) -> bool:
        with self._lock:
            return self._state.function_masked

    def counters(self) -> MsixCounters:
        with self._lock:
            return detached(self._counters)

    # ---------------------------------------------------------- the capability

    def capability_body(self) -> bytes:
        """Message control, Table Offset/BIR and PBA Offset/BIR, as the guest reads them."""
        with self._lock:
            return self._body_locked()

    def add_to(self, config: PciConfigSpace) -> int:
        """Append the MSI-X capability to ``config``, this table as its handler."""
        return config.add_capability(CAPABILITY_ID, self.capability_body(), handler=self)

    def _body_locked(self) -> bytes:
        control = self._vectors - 1
        if self._state.enabled:
            control |= CONTROL_ENABLE
        if self._state.function_masked:
            control |= CONTROL_FUNCTION_MASK
        return (
            control.to_bytes(2, "little")
            + (self._table_offset | self._table_bar).to_bytes(4, "little")
            + (self._pba_offset | self._pba_bar).to_bytes(4, "little")
        )

    def read_capability(self, offset: int, size: int) -> int:
        with self._lock:
            body = self._body_locked()
        return int.from_bytes(body[offset : offset + size], "little") if size > 0 else 0

    def write_capability(self, offset: int, size: int, value: int) -> None:
        # Only the upper byte of message control (body byte 1) has writable bits.
        if not offset <= 1 < offset + size:
            return
        high = (value >> (8 * (1 - offset))) & 0xFF
        with self._lock:
            self._state.enabled = bool(high & (CONTROL_ENABLE >> 8))
            self._state.function_masked = bool(high & (CONTROL_FUNCTION_MASK >> 8))
            self._update_locked(range(self._vectors))
        self._outbox.flush()

    # ------------------------------------------------------------ table and PBA

    def table_read(self, offset: int, size: int) -> int:
        with self._lock:
            if not self._valid_locked(offset, size, self.table_size):
                return _all_ones(size)
            value = 0
            for index, at in enumerate(range(offset, offset + size, 4)):
                value |= self._table_dword_locked(at) << (32 * index)
            return value

    def table_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if not self._valid_locked(offset, size, self.table_size):
                return
            for index, at in enumerate(range(offset, offset + size, 4)):
                self._write_table_dword_locked(at, (value >> (32 * index)) & _DWORD)
            self._update_locked([offset // ENTRY_SIZE])
        self._outbox.flush()

    def pba_read(self, offset: int, size: int) -> int:
        with self._lock:
            if not self._valid_locked(offset, size, self.pba_size):
                return _all_ones(size)
            first = offset * 8
            return sum(
                1 << bit
                for bit in range(size * 8)
                if first + bit < self._vectors and self._state.pending[first + bit]
            )

    def pba_write(self, offset: int, size: int, value: int) -> None:
        """The PBA is read-only (§6.8.2.10); a bad access is still counted."""
        with self._lock:
            self._valid_locked(offset, size, self.pba_size)

    def _valid_locked(self, offset: int, size: int, length: int) -> bool:
        if size in (4, 8) and offset % size == 0 and 0 <= offset <= length - size:
            return True
        self._counters.bad_accesses += 1
        return False

    def _table_dword_locked(self, at: int) -> int:
        vector, field_index = divmod(at, ENTRY_SIZE)
        state = self._state
        if field_index == 0:
            return state.addresses[vector] & _DWORD
        if field_index == 4:
            return state.addresses[vector] >> 32
        if field_index == 8:
            return state.data[vector]
        return VECTOR_CONTROL_MASK if state.masked[vector] else 0

    def _write_table_dword_locked(self, at: int, value: int) -> None:
        vector, field_index = divmod(at, ENTRY_SIZE)
        state = self._state
        if field_index == 0:
            state.addresses[vector] = (state.addresses[vector] & ~_DWORD) | (value & ~3)
        elif field_index == 4:
            state.addresses[vector] = (state.addresses[vector] & _DWORD) | (value << 32)
        elif field_index == 8:
            state.data[vector] = value
        else:
            state.masked[vector] = bool(value & VECTOR_CONTROL_MASK)

    # ----------------------------------------------------------------- vectors

    def signal(self, vector: int) -> None:
        """The function's event for ``vector``: fired, held pending, or dropped (see the
        module documentation)."""
        with self._lock:
            if not 0 <= vector < self._vectors or not self._state.enabled:
                self._counters.dropped_signals += 1
            elif self._message_locked(vector)[2]:
                self._state.pending[vector] = True
            else:
                self._outbox.post(functools.partial(self._sink.fire, vector))
        self._outbox.flush()

    def message(self, vector: int) -> tuple[int, int, bool]:
        """The vector's (address, data, effectively masked)."""
        if not 0 <= vector < self._vectors:
            raise ValueError(f"MSI-X vector {vector} out of range 0..{self._vectors - 1}")
        with self._lock:
            return self._message_locked(vector)

    def report_all(self) -> None:
        """Report every vector to the sink, changed or not (the VMM's re-sync)."""
        with self._lock:
            self._report_all_locked()
        self._outbox.flush()

    def _message_locked(self, vector: int) -> tuple[int, int, bool]:
        state = self._state
        masked = not state.enabled or state.function_masked or state.masked[vector]
        return state.addresses[vector], state.data[vector], masked

    def _update_locked(self, vectors: range | list[int]) -> None:
        for vector in vectors:
            message = self._message_locked(vector)
            if message != self._reported[vector]:
                self._reported[vector] = message
                self._outbox.post(functools.partial(self._sink.vector_changed, vector, *message))
            if self._state.pending[vector] and not message[2]:
                self._state.pending[vector] = False
                self._outbox.post(functools.partial(self._sink.fire, vector))

    def _report_all_locked(self) -> None:
        for vector in range(self._vectors):
            message = self._message_locked(vector)
            self._reported[vector] = message
            self._outbox.post(functools.partial(self._sink.vector_changed, vector, *message))

    # ---------------------------------------------------------------- snapshot

    def save_state(self) -> MsixState:
        with self._lock:
            return detached(self._state)

    def check_state(self, data: object) -> MsixState:
        state = state_from_data(MsixState, data, "MSI-X")
        if len(state.addresses) != self._vectors:
            raise StateError(
                "addresses", f"has {len(state.addresses)} vectors, not {self._vectors}", "MSI-X"
            )
        return state

    def restore_state(self, state: MsixState) -> None:
        """Restore, then report every vector: the routes live outside (in KVM)."""
        restored = detached(state)
        with self._lock:
            self._state = restored
            self._report_all_locked()
        self._outbox.flush()
