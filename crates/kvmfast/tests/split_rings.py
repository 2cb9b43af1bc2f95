"""The driver's side of split virtqueues in a VM's RAM, for tests that play the guest.

Each queue's descriptor table is at its base address, its available ring at base +
0x1000 and its used ring at base + 0x2000 (virtio 1.2 §2.7).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvmfast import Vm

AVAIL_OFFSET = 0x1000
USED_OFFSET = 0x2000


@dataclass
class SplitRings:
    """Queues by index, each at its base address, `size` entries each."""

    vm: Vm
    bases: Mapping[int, int]
    size: int
    avail: dict[int, int] = field(default_factory=dict)  # each queue's next avail index

    def queues(self) -> list[tuple[int, int, int, int, bool]]:
        """What VirtioDevice.activate takes: size, descriptors, avail, used, ready."""
        return [
            (self.size, base, base + AVAIL_OFFSET, base + USED_OFFSET, True)
            for base in self.bases.values()
        ]

    def descriptor(
        self, queue: int, index: int, address: int, length: int, flags: int, next_: int = 0
    ) -> None:
        entry = struct.pack("<QIHH", address, length, flags, next_)
        self.vm.write(self.bases[queue] + 16 * index, entry)

    def offer(self, queue: int, head: int) -> None:
        avail = self.bases[queue] + AVAIL_OFFSET
        index = self.avail.get(queue, 0)
        self.vm.write(avail + 4 + 2 * (index % self.size), struct.pack("<H", head))
        self.avail[queue] = (index + 1) & 0xFFFF
        self.vm.write(avail + 2, struct.pack("<H", self.avail[queue]))

    def used_idx(self, queue: int) -> int:
        (value,) = struct.unpack("<H", self.vm.read(self.bases[queue] + USED_OFFSET + 2, 2))
        return int(value)

    def used(self, queue: int, n: int) -> tuple[int, int]:
        """The used ring's entry n: the chain's head and the length the device wrote."""
        at = self.bases[queue] + USED_OFFSET + 4 + 8 * (n % self.size)
        head, length = struct.unpack("<II", self.vm.read(at, 8))
        return int(head), int(length)
