"""The virtio vendor-specific PCI capabilities (virtio 1.2 §4.1.4) and the
VIRTIO_PCI_CAP_PCI_CFG access window (§4.1.4.9).

Bodies here exclude the capability ID and next pointer, which the configuration space
fills in: they start at ``cap_len``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from kvm_devices.snapshot import bits
from kvm_devices.virtio.constants import PCI_CAP_PCI_CFG

# struct virtio_pci_cap (§4.1.4): cap_vndr, cap_next, cap_len, cfg_type, bar, id,
# padding[2], le32 offset, le32 length.
VIRTIO_PCI_CAP_LEN = 16
# Offsets within a body (that is, 2 less than within the capability).
BODY_BAR = 2
BODY_OFFSET = 6
BODY_LENGTH = 10
# struct virtio_pci_notify_cap adds le32 notify_off_multiplier; struct virtio_pci_cfg_cap
# adds u8 pci_cfg_data[4]: both at capability offset 16.
BODY_EXTRA = 14


def virtio_cap_body(
    cfg_type: int, *, bar: int, offset: int, length: int, extra: bytes = b""
) -> bytes:
    """The body of a struct virtio_pci_cap (+ ``extra``, its type's trailing fields)."""
    cap_len = VIRTIO_PCI_CAP_LEN + len(extra)
    head = bytes([cap_len, cfg_type, bar, 0, 0, 0])
    return head + offset.to_bytes(4, "little") + length.to_bytes(4, "little") + extra


@dataclass
class PciCfgWindowState:
    """The fields of the VIRTIO_PCI_CAP_PCI_CFG capability that the driver writes."""

    bar: Annotated[int, bits(8)] = 0
    offset: Annotated[int, bits(32)] = 0
    length: Annotated[int, bits(32)] = 0
    data: Annotated[int, bits(32)] = 0


class PciCfgWindow:
    """§4.1.4.9: an access to pci_cfg_data is an access of ``cap.length`` bytes at
    ``cap.offset`` of BAR ``cap.bar``, for drivers that cannot map the BAR.

    An access with a length other than 1, 2 or 4, an offset not aligned to it, a BAR other
    than ``bar_index`` or a range beyond ``bar_size`` breaks the driver's rules (§4.1.4.9.2):
    it does not reach the BAR and pci_cfg_data keeps what it held. This class only keeps
    the fields and says which BAR access is due: its owner makes that access with no lock
    held (a BAR write can activate the device), and serialises the rest.
    """

    def __init__(self, bar_index: int, bar_size: int) -> None:
        self.state = PciCfgWindowState()
        self._bar_index = bar_index
        self._bar_size = bar_size

    @staticmethod
    def touches_data(offset: int, size: int) -> bool:
        return offset < BODY_EXTRA + 4 and offset + size > BODY_EXTRA

    def body(self) -> bytes:
        state = self.state
        return virtio_cap_body(
            PCI_CAP_PCI_CFG,
            bar=state.bar,
            offset=state.offset,
            length=state.length,
            extra=state.data.to_bytes(4, "little"),
        )

    def read(self, offset: int, size: int) -> int:
        """The body's bytes as they are now (after :meth:`complete_read`, if it was due)."""
        return int.from_bytes(self.body()[offset : offset + size].ljust(size, b"\0"), "little")

    def target(self) -> tuple[int, int] | None:
        """The (offset, length) in the BAR that an access to pci_cfg_data reaches, if any."""
        state = self.state
        length = state.length
        if length not in (1, 2, 4) or state.offset % length or state.bar != self._bar_index:
            return None
        if state.offset + length > self._bar_size:
            return None
        return state.offset, length

    def complete_read(self, value: int, length: int) -> None:
        """§4.1.4.9.1: the BAR's bytes land in the first ``length`` bytes of pci_cfg_data."""
        keep = self.state.data & ~((1 << (8 * length)) - 1)
        self.state.data = keep | (value & ((1 << (8 * length)) - 1))

    def write(self, offset: int, size: int, value: int) -> tuple[int, int, int] | None:
        """Take a write to the body; returns the BAR write (offset, length, value) it makes."""
        image = bytearray(self.body())
        written = value.to_bytes(size, "little")
        for at in range(max(offset, 0), min(offset + size, len(image))):
            image[at] = written[at - offset]
        state = self.state
        state.bar = image[BODY_BAR]
        state.offset = int.from_bytes(image[BODY_OFFSET : BODY_OFFSET + 4], "little")
        state.length = int.from_bytes(image[BODY_LENGTH : BODY_LENGTH + 4], "little")
        state.data = int.from_bytes(image[BODY_EXTRA : BODY_EXTRA + 4], "little")
        target = self.target()
        if target is None or not self.touches_data(offset, size):
            return None
        bar_offset, length = target
        return bar_offset, length, state.data & ((1 << (8 * length)) - 1)
