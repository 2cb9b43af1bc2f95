"""Numbers of the virtio 1.2 specification (OASIS, "Virtual I/O Device Version 1.2") and
of our virtio-pci function's BAR0 layout (docs: /work/pci-virtio-design.md, issue 16).

Section numbers below are those of virtio 1.2.
"""

from __future__ import annotations

# §2.1 Device Status Field.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# §6 Reserved Feature Bits (those the transport itself must know about).
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_SR_IOV = 37
F_NOTIFICATION_DATA = 38
F_NOTIF_CONFIG_DATA = 39
F_RING_RESET = 40
F_ADMIN_VQ = 41
# Features that need transport support this transport does not have: never offered, whatever
# the backend says (a driver that negotiated them would use registers we do not decode).
TRANSPORT_UNSUPPORTED_FEATURES = (
    (1 << F_SR_IOV)
    | (1 << F_NOTIFICATION_DATA)
    | (1 << F_NOTIF_CONFIG_DATA)
    | (1 << F_RING_RESET)
    | (1 << F_ADMIN_VQ)
)

# §4.1.4 Virtio Structure PCI Capabilities: cfg_type.
PCI_CAP_COMMON_CFG = 1
PCI_CAP_NOTIFY_CFG = 2
PCI_CAP_ISR_CFG = 3
PCI_CAP_DEVICE_CFG = 4
PCI_CAP_PCI_CFG = 5
PCI_CAP_ID_VENDOR = 0x09  # PCI Local Bus 3.0, Appendix H: vendor-specific capability

# §4.1.4.5 ISR status bits.
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

# §4.1.5.1.2 MSI-X vector configuration: "no vector".
NO_VECTOR = 0xFFFF
# interrupt()/binding()'s source for the configuration change interrupt (queues are 0..n-1).
CONFIG_SOURCE = -1

# §4.1.2 PCI Device Discovery: modern devices are 0x1040 + device ID, revision >= 1;
# subsystem IDs >= 0x40 for modern-only devices (QEMU uses vendor 0x1af4 / id 0x40 too).
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
VIRTIO_PCI_REVISION = 1
VIRTIO_PCI_SUBSYSTEM_ID = 0x40

# §5 Device Types -> PCI class code (class, subclass, prog-if): what QEMU's virtio-pci gives.
DEVICE_TYPE_BLOCK = 2
DEVICE_TYPE_ENTROPY = 4
PCI_CLASS_STORAGE_SCSI = 0x010000
PCI_CLASS_OTHERS = 0x00FF00
CLASS_CODES = {DEVICE_TYPE_BLOCK: PCI_CLASS_STORAGE_SCSI, DEVICE_TYPE_ENTROPY: PCI_CLASS_OTHERS}

# BAR0 layout (the design contract): one 4 KiB page per structure, so that the notify page
# can be handed to KVM as ioeventfds without covering anything else.
COMMON_CFG_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_CFG_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
REGION_SIZE = 0x1000
BAR0_SIZE = 0x8000
NOTIFY_OFF_MULTIPLIER = 4
MAX_QUEUES = REGION_SIZE // NOTIFY_OFF_MULTIPLIER
