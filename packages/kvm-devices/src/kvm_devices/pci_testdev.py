"""QEMU's ``pci-testdev`` (hw/misc/pci-testdev.c): a PCI function for I/O exit tests.

Vendor 0x1B36 (Red Hat, QEMU's PCI IDs), device 0x0005, class 0x00FF00 ("other"),
revision 0, no interrupt pin. BAR0 is 4 KiB of 32-bit memory, BAR1 256 I/O ports; each
holds the same register file, the header of the test selected last:

======  =====  ===============================================================
offset  bytes  field (``struct pci_test_dev_hdr``, little-endian)
======  =====  ===============================================================
0       1      ``test``: its number; a write here selects a test (below)
1       1      ``width``: 1, the size of the write the test counts
4       4      ``offset``: where the test's writes go (2048 + n in BAR0, 128 + n in BAR1)
8       1      ``data``: the byte a datamatch write must carry (0xFA; 0xCE if any)
12      4      ``count``: how many of the test's writes the device saw
16      ...    ``name``: "mmio-no-eventfd", ..., "portio-datamatch-eventfd", NUL
======  =====  ===============================================================

Six tests: n = 0, 1, 2 ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd") of
type "mmio", and 3, 4, 5 of type "portio". As QEMU's memory core drives the device
(``impl`` access size 1), every access is split into bytes at ascending offsets:

* a byte written at offset 0 of BAR0 selects test ``v`` (v < 3), of BAR1 test 3 + v,
  with its count cleared; ``v`` >= 3 selects none;
* with a test selected, a byte written at its ``offset`` (through either BAR) counts,
  unless the test matches data and the byte is not ``data`` ("wildcard" counts any);
* a read returns byte ``offset`` of the selected test's header, 0 with none selected
  and at or past the header's last byte (QEMU: ``addr + size >= bufsize``).

Where QEMU differs: its "eventfd" tests put a KVM ioeventfd at ``offset``, so KVM
consumes those writes and ``count`` stays 0. This model has no ioeventfd and counts
them; kvm-unit-tests' driver (lib/pci-testdev.c) takes either a count of 0 or the
number of writes it made as a pass.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kvm_devices.pci.config_space import PciConfigSpace

VENDOR_ID = 0x1B36
DEVICE_ID = 0x0005
CLASS_CODE = 0x00FF00  # base class 0x00, subclass 0xFF: QEMU's PCI_CLASS_OTHERS
MEMORY_BAR = 0
IO_BAR = 1
MEMORY_BAR_SIZE = 2 * 2048  # IOTEST_MEMSIZE * 2
IO_BAR_SIZE = 2 * 128  # IOTEST_IOSIZE * 2
TEST_NAMES = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
TYPES = ("mmio", "portio")
DATAMATCH = 0xFA
NOMATCH = 0xCE
WIDTH = 1


@dataclass
class _Test:
    """One test's header (QEMU's ``PCITestDevHdr``) and what it counts."""

    number: int
    offset: int
    match_data: bool
    name: str
    count: int = 0

    @property
    def data(self) -> int:
        return DATAMATCH if self.match_data else NOMATCH

    def header(self) -> bytes:
        return (
            bytes((self.number, WIDTH, 0, 0))
            + self.offset.to_bytes(4, "little")
            + bytes((self.data, 0, 0, 0))
            + self.count.to_bytes(4, "little")
            + self.name.encode()
            + b"\0"
        )


def _tests() -> list[_Test]:
    tests = []
    for number in range(len(TYPES) * len(TEST_NAMES)):
        kind, test = TYPES[number // len(TEST_NAMES)], TEST_NAMES[number % len(TEST_NAMES)]
        base = MEMORY_BAR_SIZE // 2 if kind == "mmio" else IO_BAR_SIZE // 2
        tests.append(
            _Test(number, base + number * WIDTH, test != "wildcard-eventfd", f"{kind}-{test}")
        )
    return tests


@dataclass
class _Bar:
    """One BAR's register file, as a Device (offsets within the BAR)."""

    device: PciTestdev
    kind: int  # index into TYPES
    size: int

    def read(self, offset: int, size: int) -> int:
        if not 0 <= offset < self.size or size <= 0:
            return (1 << (8 * max(size, 0))) - 1
        return self.device.read_bytes(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if not 0 <= offset < self.size or size <= 0:
            return
        for index in range(min(size, self.size - offset)):
            self.device.write_byte(self.kind, offset + index, (value >> (8 * index)) & 0xFF)


@dataclass
class PciTestdev:
    """The function: ``config`` for bus 0, ``memory`` and ``io`` the BARs' registers."""

    memory_address: int = 0
    io_address: int = 0
    config: PciConfigSpace = field(init=False)
    memory: _Bar = field(init=False)
    io: _Bar = field(init=False)
    _tests: list[_Test] = field(default_factory=_tests, init=False)
    _current: int | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.config = PciConfigSpace(
            vendor_id=VENDOR_ID, device_id=DEVICE_ID, class_code=CLASS_CODE
        )
        self.config.add_memory_bar(
            MEMORY_BAR, MEMORY_BAR_SIZE, is_64bit=False, address=self.memory_address
        )
        self.config.add_io_bar(IO_BAR, IO_BAR_SIZE, address=self.io_address)
        self.memory = _Bar(self, TYPES.index("mmio"), MEMORY_BAR_SIZE)
        self.io = _Bar(self, TYPES.index("portio"), IO_BAR_SIZE)

    def read_bytes(self, offset: int, size: int) -> int:
        with self._lock:
            if self._current is None:
                return 0
            header = self._tests[self._current].header()
        value = 0
        for index in range(size):
            at = offset + index
            byte = header[at] if at + 1 < len(header) else 0
            value |= byte << (8 * index)
        return value

    def write_byte(self, kind: int, offset: int, byte: int) -> None:
        with self._lock:
            if offset == 0:
                self._current = None
                if byte < len(TEST_NAMES):
                    self._current = kind * len(TEST_NAMES) + byte
                    self._tests[self._current].count = 0
                return
            if self._current is None:
                return
            test = self._tests[self._current]
            if offset != test.offset or (test.match_data and byte != test.data):
                return
            test.count = (test.count + 1) & 0xFFFF_FFFF

    def reset(self) -> None:
        """A device reset: no test selected (QEMU's ``pci_testdev_reset``)."""
        with self._lock:
            self._current = None
