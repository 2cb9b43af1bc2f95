"""A split-irqchip virtual machine monitor assembled from kvm-devices and kvmfast.

The library first: build a :class:`Machine` from a :class:`MachineConfig`, boot a
description (:class:`LinuxBoot`, :class:`MultibootBoot`, :func:`default_guest`),
then start, pause, resume, stop and wait; talk to the guest through
``machine.serial``; read ``machine.stats()``; reach every device by name in
``machine.devices``, add your own with ``machine.add_device()``, save and restore
their state with ``machine.save_state()`` / ``restore_state()``. The ``kvm-vmm`` command is a front
end to the same calls (kvm_vmm.cli).
"""

from kvm_vmm.added_devices import AddedDevice, DeviceAccessError
from kvm_vmm.boot import (
    BootDescription,
    BootReport,
    DemoBoot,
    LinuxBoot,
    MultibootBoot,
    default_guest,
    describe_kernel,
)
from kvm_vmm.machine import (
    Machine,
    MachineConfig,
    MachineConfigError,
    MachineState,
    MachineStateError,
    Outcome,
)
from kvm_vmm.machine_state import NotSnapshottable
from kvm_vmm.milestones import Milestone
from kvm_vmm.serial_console import ConsoleTimeout, SerialConsole
from kvm_vmm.snapshot import SnapshotError
from kvm_vmm.vsock_client import VsockRefused, vsock_connect

__version__ = "0.1.0"

__all__ = [
    "AddedDevice",
    "BootDescription",
    "BootReport",
    "ConsoleTimeout",
    "DemoBoot",
    "DeviceAccessError",
    "LinuxBoot",
    "Machine",
    "MachineConfig",
    "MachineConfigError",
    "MachineState",
    "MachineStateError",
    "Milestone",
    "MultibootBoot",
    "NotSnapshottable",
    "Outcome",
    "SerialConsole",
    "SnapshotError",
    "VsockRefused",
    "default_guest",
    "describe_kernel",
    "vsock_connect",
]
