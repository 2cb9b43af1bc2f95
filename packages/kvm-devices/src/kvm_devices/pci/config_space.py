"""The 256-byte configuration space of a PCI function with a type 0 header.

References: PCI Local Bus Specification 3.0, §6.1 "Configuration Space Organization"
(figure 6-1, the type 0 header) and §6.2 "Configuration Space Functions": §6.2.1 device
identification, §6.2.2 command register (figure 6-2), §6.2.3 status register
(figure 6-3), §6.2.4 miscellaneous registers (interrupt line and pin), §6.2.5 base
addresses (BAR sizing: "writing a value of all 1's to the register, then reading the
value back"); §6.7 "Capabilities List".

Behaviour and choices:

* Vendor, device, revision, class code, header type, subsystem IDs, the capabilities
  pointer and the interrupt pin are read-only. So is every bit of a capability unless the
  owner gives a writable mask for it, or a :class:`CapabilityHandler` that owns the
  capability's body (MSI-X does: its control register acts at once).
* COMMAND: I/O space (bit 0), memory space (bit 1), bus master (bit 2) and interrupt
  disable (bit 10) are writable; the other bits are hard-wired 0, which the spec allows
  for what a function does not implement (parity and SERR# reporting, MWI...).
* STATUS: bit 4 (capabilities list) is set once a capability is added; bit 3 (interrupt
  status) follows :meth:`PciConfigSpace.set_interrupt_status`, the owner's INTx line.
  The error bits are RW1C on hardware; nothing on this virtual bus ever fails a
  transaction, so they are never set and read 0 (a write of 1 to them clears nothing).
* Cache line size (0x0C) and interrupt line (0x3C) are read-write scratch registers; the
  latency timer, BIST, expansion ROM BAR, Min_Gnt and Max_Lat read 0 (not implemented).
* BARs are memory BARs (32- or 64-bit) or I/O BARs. A BAR's writable bits are
  ``~(size - 1)`` above its flag bits, so sizing is the masked write itself: all ones
  read back as ``~(size - 1) | flags``. A 64-bit BAR takes two slots, the upper one all
  writable above the size. An I/O BAR (bit 0 set, §6.2.5.1) decodes x86's 64 KiB port
  space: its bits 31-16 are hard-wired 0, which the spec allows ("upper 16 bits ...
  may be hardwired to zero" for devices that decode only 64 KiB of I/O).
* Any offset and size (1 to 8 bytes) is accepted: bytes beyond the 256 read 0xFF and
  ignore writes; other sizes read all ones. The configuration mechanisms in front
  (:mod:`kvm_devices.pci.host_bridge`) refuse unaligned accesses before they get here.

Thread-safety: one lock guards the bytes. ``on_bars_changed`` is posted to the outbox when
a BAR's programmed base (:meth:`PciConfigSpace.bar_address`) or the memory- or I/O-space
bit changes, and made after the lock is released (docs/architecture.md, "Device locks"). A
capability handler is called with no lock of the configuration space held.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Protocol

from kvm_devices.outbox import Outbox
from kvm_devices.snapshot import Length, Snapshotting, StateError, detached, state_from_data

SIZE = 256

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09
CACHE_LINE_SIZE = 0x0C
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

# The first byte after the type 0 header (§6.7: capabilities live in the device-specific
# part, dword aligned).
CAPABILITIES_START = 0x40

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE

STATUS_INTERRUPT = 1 << 3
STATUS_CAPABILITIES = 1 << 4

BAR_MEMORY_64BIT = 0b10 << 1
BAR_PREFETCHABLE = 1 << 3
BAR_IO_SPACE = 1 << 0
IO_SPACE_LIMIT = 1 << 16
BAR_FLAGS = 0xF
# §6.2.5.1: a memory BAR decodes at least 16 bytes (its four flag bits).
BAR_MIN_SIZE = 16


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1 if size > 0 else 0


class CapabilityHandler(Protocol):
    """The owner of a capability's body (the bytes after its ID and next pointer).

    Offsets are relative to the body's first byte; accesses never extend past the body.
    Both are called with no lock of the configuration space held, so they may call back.
    """

    def read_capability(self, offset: int, size: int) -> int: ...

    def write_capability(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class _Bar:
    size: int
    is_64bit: bool
    is_io: bool = False


@dataclass(frozen=True)
class _HandledBody:
    start: int  # first byte of the body in configuration space
    length: int
    handler: CapabilityHandler


@dataclass
class PciConfigState:
    """The bits of the 256 bytes that the guest wrote or the function set (the BARs'
    addresses, COMMAND, cache line size, interrupt line, writable capability bits, the
    interrupt status); every other bit follows from the function's configuration."""

    registers: Annotated[bytes, Length(exact=SIZE)] = bytes(SIZE)


class PciConfigSpace(Snapshotting[PciConfigState]):
    """A type 0 header, its BARs and its capability list."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
    ) -> None:
        for name, value, width in (
            ("vendor_id", vendor_id, 16),
            ("device_id", device_id, 16),
            ("class_code", class_code, 24),
            ("revision", revision, 8),
            ("subsystem_vendor_id", subsystem_vendor_id, 16),
            ("subsystem_id", subsystem_id, 16),
        ):
            if not 0 <= value < 1 << width:
                raise ValueError(f"{name} {value:#x} does not fit in {width} bits")
        if vendor_id == 0xFFFF:
            raise ValueError("vendor ID 0xFFFF means 'no function' (§6.2.1)")
        if not 0 <= interrupt_pin <= 4:
            raise ValueError(f"interrupt pin {interrupt_pin}: 0 (none) or 1..4 (INTA..INTD)")
        self._lock = threading.Lock()
        self._outbox = Outbox(self._lock)
        self._data = bytearray(SIZE)
        self._writable = bytearray(SIZE)
        # Bits the function itself changes (read-only to the guest), saved with the state.
        self._device_set = bytearray(SIZE)
        self._bars: list[_Bar | None] = [None] * BAR_COUNT
        self._upper_halves: set[int] = set()
        self._handled: list[_HandledBody] = []
        self._last_capability: int | None = None
        self._next_capability = CAPABILITIES_START
        self.on_bars_changed: Callable[[], None] | None = None
        self._put(VENDOR_ID, 2, vendor_id)
        self._put(DEVICE_ID, 2, device_id)
        self._put(REVISION_ID, 1, revision)
        self._put(CLASS_CODE, 3, class_code)
        self._put(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(SUBSYSTEM_ID, 2, subsystem_id)
        self._put(INTERRUPT_PIN, 1, interrupt_pin)
        self._put_mask(self._writable, COMMAND, 2, COMMAND_WRITABLE)
        self._put_mask(self._writable, CACHE_LINE_SIZE, 1, 0xFF)
        self._put_mask(self._writable, INTERRUPT_LINE, 1, 0xFF)
        self._put_mask(self._device_set, STATUS, 2, STATUS_INTERRUPT)

    # ------------------------------------------------------------------ set-up

    def add_memory_bar(
        self,
        index: int,
        size: int,
        *,
        is_64bit: bool = True,
        prefetchable: bool = False,
        address: int = 0,
    ) -> None:
        """Declare memory BAR ``index`` of ``size`` bytes (a power of two, >= 16)."""
        last = BAR_COUNT - 2 if is_64bit else BAR_COUNT - 1
        if not 0 <= index <= last:
            raise ValueError(f"BAR index {index} out of range 0..{last}")
        slots = (index, index + 1) if is_64bit else (index,)
        for slot in slots:
            if self._bars[slot] is not None or slot in self._upper_halves:
                raise ValueError(f"BAR slot {slot} is already in use")
        limit = 1 << (64 if is_64bit else 32)
        if size < BAR_MIN_SIZE or size & (size - 1) or size > limit // 2:
            raise ValueError(f"BAR size {size:#x} is not a power of two in [16, {limit // 2:#x}]")
        if address % size or address >= limit:
            raise ValueError(f"BAR address {address:#x} is not a {size:#x}-aligned address")
        flags = (BAR_MEMORY_64BIT if is_64bit else 0) | (BAR_PREFETCHABLE if prefetchable else 0)
        writable = (limit - 1) & ~(size - 1)
        offset = BAR0 + 4 * index
        with self._lock:
            self._bars[index] = _Bar(size, is_64bit)
            self._put(offset, 4, (address & 0xFFFF_FFFF) | flags)
            self._put_mask(self._writable, offset, 4, writable & 0xFFFF_FFF0)
            if is_64bit:
                self._upper_halves.add(index + 1)
                self._put(offset + 4, 4, address >> 32)
                self._put_mask(self._writable, offset + 4, 4, writable >> 32)

    def add_io_bar(self, index: int, size: int, *, address: int = 0) -> None:
        """Declare I/O BAR ``index`` of ``size`` ports (a power of two, 4 to 256: §6.2.5.1
        "I/O ... no more than 256 bytes per BAR")."""
        if not 0 <= index < BAR_COUNT:
            raise ValueError(f"BAR index {index} out of range 0..{BAR_COUNT - 1}")
        if self._bars[index] is not None or index in self._upper_halves:
            raise ValueError(f"BAR slot {index} is already in use")
        if size < 4 or size & (size - 1) or size > 256:
            raise ValueError(f"I/O BAR size {size:#x} is not a power of two in [4, 0x100]")
        if address % size or address >= IO_SPACE_LIMIT:
            raise ValueError(f"I/O BAR address {address:#x} is not a {size:#x}-aligned port")
        offset = BAR0 + 4 * index
        with self._lock:
            self._bars[index] = _Bar(size, is_64bit=False, is_io=True)
            self._put(offset, 4, address | BAR_IO_SPACE)
            self._put_mask(self._writable, offset, 4, (IO_SPACE_LIMIT - 1) & ~(size - 1))

    def add_capability(
        self,
        cap_id: int,
        body: bytes,
        *,
        writable_mask: bytes | None = None,
        handler: CapabilityHandler | None = None,
    ) -> int:
        """Append a capability; returns its offset. ``body`` excludes the ID and next
        pointer, which this space fills in. A handler owns the body's reads and writes
        (``body`` then only sizes it); else ``writable_mask`` (as long as ``body``) says
        which of its bits the guest may write."""
        if not 0 <= cap_id <= 0xFF:
            raise ValueError(f"capability ID {cap_id:#x} is not a byte")
        if writable_mask is not None and len(writable_mask) != len(body):
            raise ValueError("writable_mask must be as long as body")
        if writable_mask is not None and handler is not None:
            raise ValueError("a handled capability's body is its handler's: no writable_mask")
        with self._lock:
            offset = self._next_capability
            end = offset + 2 + len(body)
            if end > SIZE:
                raise ValueError(f"no room for a {len(body) + 2}-byte capability at {offset:#x}")
            self._data[offset] = cap_id
            self._data[offset + 1] = 0
            self._data[offset + 2 : end] = body
            if writable_mask is not None:
                self._writable[offset + 2 : end] = writable_mask
            if handler is not None and body:
                self._handled.append(_HandledBody(offset + 2, len(body), handler))
            if self._last_capability is None:
                self._data[CAPABILITIES_POINTER] = offset
                self._data[STATUS] |= STATUS_CAPABILITIES
            else:
                self._data[self._last_capability + 1] = offset
            self._last_capability = offset
            self._next_capability = (end + 3) & ~3
        return offset

    # ---------------------------------------------------------------- accesses

    def read(self, offset: int, size: int) -> int:
        if not 1 <= size <= 8:
            return _all_ones(size)
        with self._lock:
            raw = bytearray(
                self._data[at] if 0 <= at < SIZE else 0xFF for at in range(offset, offset + size)
            )
        for body, start, length in self._handled_parts(offset, size):
            part = body.handler.read_capability(start - body.start, length) & _all_ones(length)
            relative = start - offset
            raw[relative : relative + length] = part.to_bytes(length, "little")
        return int.from_bytes(raw, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if not 1 <= size <= 8:
            return
        handled = self._handled_parts(offset, size)
        skip = {at for _, start, length in handled for at in range(start, start + length)}
        with self._lock:
            before = self._mapping_locked()
            for index, at in enumerate(range(offset, offset + size)):
                if 0 <= at < SIZE and at not in skip:
                    byte = (value >> (8 * index)) & 0xFF
                    mask = self._writable[at]
                    self._data[at] = (self._data[at] & ~mask) | (byte & mask)
            if self._mapping_locked() != before:
                self._outbox.post(self._bars_changed)
        self._outbox.flush()
        for body, start, length in handled:
            part = (value >> (8 * (start - offset))) & _all_ones(length)
            body.handler.write_capability(start - body.start, length, part)

    def _handled_parts(self, offset: int, size: int) -> list[tuple[_HandledBody, int, int]]:
        """The stretches of ``[offset, offset + size)`` that handlers own."""
        parts = []
        for body in self._handled:
            start = max(offset, body.start)
            end = min(offset + size, body.start + body.length)
            if start < end:
                parts.append((body, start, end - start))
        return parts

    # ------------------------------------------------------------ the function

    def bar_address(self, index: int) -> int | None:
        """BAR ``index``'s programmed base; None when it is 0 or no BAR starts there."""
        with self._lock:
            return self._bar_address_locked(index)

    @property
    def memory_enabled(self) -> bool:
        return bool(self._command() & COMMAND_MEMORY)

    @property
    def io_enabled(self) -> bool:
        return bool(self._command() & COMMAND_IO)

    def bar_is_io(self, index: int) -> bool:
        bar = self._bars[index] if 0 <= index < BAR_COUNT else None
        return bar is not None and bar.is_io

    @property
    def bus_master(self) -> bool:
        return bool(self._command() & COMMAND_BUS_MASTER)

    @property
    def intx_disabled(self) -> bool:
        """COMMAND bit 10: the function must not assert INTx (§6.2.2)."""
        return bool(self._command() & COMMAND_INTX_DISABLE)

    def set_interrupt_status(self, asserted: bool) -> None:
        """STATUS bit 3: the function's INTx request, whatever COMMAND bit 10 says."""
        with self._lock:
            if asserted:
                self._data[STATUS] |= STATUS_INTERRUPT
            else:
                self._data[STATUS] &= ~STATUS_INTERRUPT

    def _command(self) -> int:
        with self._lock:
            return self._data[COMMAND] | self._data[COMMAND + 1] << 8

    def _bar_address_locked(self, index: int) -> int | None:
        if not 0 <= index < BAR_COUNT:
            return None
        bar = self._bars[index]
        if bar is None:
            return None
        offset = BAR0 + 4 * index
        address = self._get(offset, 4) & ~(BAR_IO_SPACE if bar.is_io else BAR_FLAGS)
        if bar.is_64bit:
            address |= self._get(offset + 4, 4) << 32
        return address or None

    def _mapping_locked(self) -> tuple[int, tuple[int | None, ...]]:
        decode = self._data[COMMAND] & (COMMAND_MEMORY | COMMAND_IO)
        return decode, tuple(self._bar_address_locked(i) for i in range(BAR_COUNT))

    def _bars_changed(self) -> None:
        callback = self.on_bars_changed
        if callback is not None:
            callback()

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self._data[offset : offset + size], "little")

    def _put(self, offset: int, size: int, value: int) -> None:
        self._data[offset : offset + size] = value.to_bytes(size, "little")

    @staticmethod
    def _put_mask(masks: bytearray, offset: int, size: int, value: int) -> None:
        masks[offset : offset + size] = value.to_bytes(size, "little")

    # ---------------------------------------------------------------- snapshot

    def _variable(self) -> bytes:
        return bytes(w | d for w, d in zip(self._writable, self._device_set, strict=True))

    def save_state(self) -> PciConfigState:
        with self._lock:
            variable = self._variable()
            return PciConfigState(bytes(b & v for b, v in zip(self._data, variable, strict=True)))

    def check_state(self, data: object) -> PciConfigState:
        state = state_from_data(PciConfigState, data, "PCI configuration space")
        with self._lock:
            variable = self._variable()
        for at, (byte, allowed) in enumerate(zip(state.registers, variable, strict=True)):
            if byte & ~allowed:
                raise StateError(
                    "registers",
                    f"byte {at:#x} is {byte:#04x}: bits outside {allowed:#04x} are this"
                    " function's configuration",
                    "PCI configuration space",
                )
        return state

    def restore_state(self, state: PciConfigState) -> None:
        """Restore, then tell the owner to re-map its BARs: the mapping lives outside."""
        restored = detached(state)
        with self._lock:
            variable = self._variable()
            self._data[:] = bytes(
                (b & ~v) | r
                for b, v, r in zip(self._data, variable, restored.registers, strict=True)
            )
            self._outbox.post(self._bars_changed)
        self._outbox.flush()
