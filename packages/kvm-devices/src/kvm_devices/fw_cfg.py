"""QEMU's firmware configuration device, traditional (non-DMA) I/O interface.

Reference: QEMU docs/specs/fw_cfg.rst ("Guest-side Hardware Interface") and, where the
document defers to the source, hw/nvram/fw_cfg.c (``fw_cfg_comb_*``, ``fw_cfg_select``,
``fw_cfg_data_read``).

One two-byte window at I/O 0x510 (:attr:`FwCfg.BASE`):

* A 16-bit write at offset 0 writes the selector (little-endian): it picks an item and
  sets the data offset to 0. Bit 15 picks the architecture-specific item table; bit 14
  (the retired "write channel") is ignored for reads, as in QEMU.
* An 8-bit read at offset 1 (port 0x511, the data register) returns the next byte of the
  selected item and advances the offset. Past the item's end, and for any selector that
  names no item, it reads 0 and the offset stays put.
* Like QEMU's combined region, an 8-bit read at offset 0 also reads the data register,
  8-bit writes are data writes (ignored: the traditional interface is read-only since
  QEMU 2.4), and an 8-bit write never moves the selector.
* Other widths are rejected by QEMU's access check (``fw_cfg_comb_valid``): such writes
  are ignored and such reads return all-ones, as undecoded ones. An access that runs
  past the window's end is clipped to the bytes inside it (QEMU's memory core does so),
  so a 32-bit write at offset 0 writes the selector from its low 16 bits and a 16-bit
  write at offset 1 is an ignored 8-bit data write; bytes beyond the window read as
  all-ones.

No DMA interface: the ID item has only bit 0 (traditional interface) set, and port 0x514
is not part of this device.

Items are configuration given at construction, not snapshot state: a snapshot holds the
selector and the data offset, and must be restored into a device built with the same
items and files. The file directory holds exactly the files given (QEMU pads it with
empty slots up to its slot count; guests read ``count`` entries either way).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated

from kvm_devices.snapshot import Range, Snapshotting, StateError, bits, detached, state_from_data


class FwCfgItem(IntEnum):
    """Selector keys of QEMU's numbered items (include/standard-headers/linux/qemu_fw_cfg.h)."""

    SIGNATURE = 0x00
    ID = 0x01
    UUID = 0x02
    RAM_SIZE = 0x03
    NOGRAPHIC = 0x04
    NB_CPUS = 0x05
    MACHINE_ID = 0x06
    KERNEL_ADDR = 0x07
    KERNEL_SIZE = 0x08
    KERNEL_CMDLINE = 0x09
    INITRD_ADDR = 0x0A
    INITRD_SIZE = 0x0B
    BOOT_DEVICE = 0x0C
    NUMA = 0x0D
    BOOT_MENU = 0x0E
    MAX_CPUS = 0x0F
    KERNEL_ENTRY = 0x10
    KERNEL_DATA = 0x11
    INITRD_DATA = 0x12
    CMDLINE_ADDR = 0x13
    CMDLINE_SIZE = 0x14
    CMDLINE_DATA = 0x15
    SETUP_ADDR = 0x16
    SETUP_SIZE = 0x17
    SETUP_DATA = 0x18
    FILE_DIR = 0x19


FILE_FIRST = 0x20
"""Selector of the first file; files follow in name order."""
ARCH_LOCAL = 0x8000
"""Selector bit of the architecture-specific item table."""
WRITE_CHANNEL = 0x4000
"""Retired selector bit that once asked for write access; ignored."""
ENTRY_MASK = 0x3FFF
FILE_NAME_BYTES = 56
"""Size of the NUL-terminated name field of a directory entry."""
SIGNATURE = b"QEMU"
ID_TRADITIONAL = 0x1
"""FW_CFG_ID bit 0: the traditional (selector/data port) interface."""


def le16(value: int) -> bytes:
    """A 16-bit little-endian item, as QEMU's ``fw_cfg_add_i16`` stores it."""
    return (value & 0xFFFF).to_bytes(2, "little")


def le32(value: int) -> bytes:
    """A 32-bit little-endian item, as QEMU's ``fw_cfg_add_i32`` stores it."""
    return (value & 0xFFFF_FFFF).to_bytes(4, "little")


def le64(value: int) -> bytes:
    """A 64-bit little-endian item, as QEMU's ``fw_cfg_add_i64`` stores it."""
    return (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")


@dataclass
class FwCfgState:
    """The guest-visible cursor: which item is selected and how far it has been read."""

    selector: Annotated[int, bits(16)] = FwCfgItem.SIGNATURE.value
    offset: Annotated[int, Range(0)] = 0


class FwCfg(Snapshotting[FwCfgState]):
    """The fw_cfg selector/data window at I/O 0x510."""

    BASE = 0x510
    LENGTH = 2
    SELECTOR_OFFSET = 0
    DATA_OFFSET = 1

    def __init__(
        self,
        ram_size: int,
        nb_cpus: int,
        max_cpus: int | None = None,
        items: Mapping[int, bytes] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        max_cpus = nb_cpus if max_cpus is None else max_cpus
        if not 0 <= ram_size < 1 << 64:
            raise ValueError(f"fw_cfg: ram_size {ram_size} does not fit 64 bits")
        if not 1 <= nb_cpus <= max_cpus <= 0xFFFF:
            raise ValueError(f"fw_cfg: need 1 <= nb_cpus ({nb_cpus}) <= max_cpus ({max_cpus})")
        self._items: dict[int, bytes] = {
            FwCfgItem.SIGNATURE: SIGNATURE,
            FwCfgItem.ID: le32(ID_TRADITIONAL),
            FwCfgItem.UUID: bytes(16),
            FwCfgItem.RAM_SIZE: le64(ram_size),
            # No display device exists in this VMM.
            FwCfgItem.NOGRAPHIC: le16(1),
            FwCfgItem.NB_CPUS: le16(nb_cpus),
            FwCfgItem.MAX_CPUS: le16(max_cpus),
            # QEMU's x86 layout: node count, then one node number per possible CPU.
            FwCfgItem.NUMA: le64(0) + bytes(8 * max_cpus),
            FwCfgItem.BOOT_MENU: le16(0),
        }
        for key, data in (items or {}).items():
            self._items[_checked_item_key(key)] = _checked_bytes(f"item {key:#x}", data)
        names = sorted((files or {}).items(), key=lambda entry: _checked_name(entry[0]))
        if len(names) > ENTRY_MASK + 1 - FILE_FIRST:
            raise ValueError(f"fw_cfg: {len(names)} files do not fit the selector space")
        directory = bytearray(len(names).to_bytes(4, "big"))
        for index, (name, data) in enumerate(names):
            select = FILE_FIRST + index
            blob = _checked_bytes(f"file {name!r}", data)
            self._items[select] = blob
            directory += len(blob).to_bytes(4, "big") + select.to_bytes(2, "big") + bytes(2)
            directory += _checked_name(name).ljust(FILE_NAME_BYTES, b"\0")
        self._items[FwCfgItem.FILE_DIR] = bytes(directory)
        self._lock = threading.Lock()
        self._state = FwCfgState()

    def item(self, selector: int) -> bytes:
        """The bytes a guest reads after writing ``selector`` (empty when none)."""
        return self._items.get(_table_key(selector), b"")

    # ------------------------------------------------------------------ access

    def read(self, offset: int, size: int) -> int:
        inside = _bytes_inside(offset, size, self.LENGTH)
        if inside != 1:
            return _all_ones(size)
        with self._lock:
            byte = self._read_data_locked()
        return byte | (_all_ones(size) & ~0xFF)

    def write(self, offset: int, size: int, value: int) -> None:
        inside = _bytes_inside(offset, size, self.LENGTH)
        if inside == 2 and offset == self.SELECTOR_OFFSET:
            with self._lock:
                self._state = FwCfgState(selector=value & 0xFFFF, offset=0)

    def _read_data_locked(self) -> int:
        data = self.item(self._state.selector)
        if self._state.offset >= len(data):
            return 0
        byte = data[self._state.offset]
        self._state.offset += 1
        return byte

    # ---------------------------------------------------------------- snapshot

    def save_state(self) -> FwCfgState:
        with self._lock:
            return detached(self._state)

    def check_state(self, data: object) -> FwCfgState:
        state = state_from_data(FwCfgState, data, "fw_cfg")
        # Items are configuration: the state must fit the items this device was built with.
        length = len(self.item(state.selector))
        if state.offset > length:
            raise StateError(
                "offset", f"{state.offset} is past the selected item's {length} bytes", "fw_cfg"
            )
        return state

    def restore_state(self, state: FwCfgState) -> None:
        with self._lock:
            self._state = detached(state)


def _table_key(selector: int) -> int:
    return selector & (ARCH_LOCAL | ENTRY_MASK)


def _checked_item_key(key: int) -> int:
    if not 0 <= key <= 0xFFFF or key & WRITE_CHANNEL:
        raise ValueError(f"fw_cfg: item key {key:#x} is not a read selector")
    if key == FwCfgItem.FILE_DIR:
        raise ValueError("fw_cfg: the file directory is built from `files`")
    if not key & ARCH_LOCAL and key >= FILE_FIRST:
        raise ValueError(f"fw_cfg: key {key:#x} is in the file range; pass it in `files`")
    return key


def _checked_bytes(what: str, data: bytes) -> bytes:
    if not isinstance(data, bytes | bytearray):
        raise ValueError(f"fw_cfg: {what} must be bytes")
    if len(data) >= 1 << 32:
        raise ValueError(f"fw_cfg: {what} is too large for a 32-bit size")
    return bytes(data)


def _checked_name(name: str) -> bytes:
    try:
        encoded = name.encode("ascii")
    except UnicodeEncodeError as error:
        raise ValueError(f"fw_cfg: file name {name!r} is not ASCII") from error
    if not encoded or b"\0" in encoded or len(encoded) >= FILE_NAME_BYTES:
        raise ValueError(f"fw_cfg: file name {name!r} must be 1..55 bytes without NUL")
    return encoded


def _bytes_inside(offset: int, size: int, length: int) -> int:
    """How many bytes of the access fall inside the window, 0 if it starts outside."""
    if not 0 <= offset < length or size < 1:
        return 0
    return min(size, length - offset)


def _all_ones(size: int) -> int:
    return (1 << (8 * max(size, 0))) - 1
