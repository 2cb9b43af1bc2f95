"""The platform's device state as one JSON-able dict, saved and restored all or nothing.

Every device of the platform (and each optional device the machine added) saves its
state under its platform-table name (:func:`platform_devices`); :func:`restore_machine_state` checks
every part first and changes nothing if any is wrong (one
:class:`~kvm_devices.snapshot.StateError` naming the device, the field path and the
problem), then restores them, the interrupt controllers first so that the sources'
lines, driven to their saved levels, find the controllers already in their saved state.

The interrupt wiring (:mod:`kvm_vmm.interrupts`) keeps no state of its own to save: the
ISA lines are plain fan-outs, and the IOAPIC's MSI routes in KVM are a function of the
IOAPIC's redirection entries. KVM has no ioctl that reads routes back, so they are not
saved but re-sent: restoring the IOAPIC reports every pin's route to its sink before
any delivery, and the sink writes to KVM each route that differs from what it last sent
to this VM (the only writer of this VM's routes), so KVM ends with the restored routes.

The state is only consistent if the vCPUs are paused while it is saved; that is the
machine's business.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from kvm_devices.interfaces import Snapshottable
from kvm_devices.snapshot import StateError
from kvm_vmm.platform import Platform

WHOLE = "machine"
SNAPSHOT_METHODS = ("save_state", "check_state", "restore_state", "save", "restore")


class NotSnapshottable(TypeError):
    """A machine's state asked for while one of its devices cannot save its own."""


def snapshottable(devices: Mapping[str, object], call: str) -> dict[str, Snapshottable[Any]]:
    """``devices`` as Snapshottables, or :class:`NotSnapshottable` naming each one
    without the protocol's methods: a state that left it out would not restore the
    machine, so it is refused rather than skipped."""
    unable = [
        name
        for name, device in devices.items()
        if not all(callable(getattr(device, method, None)) for method in SNAPSHOT_METHODS)
    ]
    if unable:
        raise NotSnapshottable(
            f"{call}: device(s) {', '.join(map(repr, unable))} cannot save their state"
            f" (no {'/'.join(SNAPSHOT_METHODS)}: kvm_devices.interfaces.Snapshottable)"
        )
    # Checked above, method by method: the protocol is not runtime-checkable.
    return cast(dict[str, Snapshottable[Any]], dict(devices))


def platform_devices(
    platform: Platform, extra: Mapping[str, Snapshottable[Any]] | None = None
) -> dict[str, Snapshottable[Any]]:
    """Every device whose state the machine saves, by its platform-table name, in
    restore order.

    The interrupt controllers come first (see the module documentation); port 61h's
    state is part of the PIT's.
    """
    devices: dict[str, Snapshottable[Any]] = {
        "pic": platform.pic,
        "ioapic": platform.ioapic,
        "pit": platform.pit,
        "com1": platform.uart,
        "rtc": platform.rtc,
        "i8042": platform.i8042,
        "acpi-pm": platform.acpi_pm,
        "reset": platform.reset_port,
        "fw_cfg": platform.fw_cfg,
        "pci": platform.pci,
    }
    for name, device in (extra or {}).items():
        if name in devices:
            raise ValueError(f"optional device name {name!r} is a platform device's")
        devices[name] = device
    return devices


def save_machine_state(
    platform: Platform, extra: Mapping[str, Snapshottable[Any]] | None = None
) -> dict[str, object]:
    """Every device's state by name, as JSON-able data (``json.dumps`` takes it as is)."""
    return {name: device.save() for name, device in platform_devices(platform, extra).items()}


def restore_machine_state(
    platform: Platform,
    state: object,
    extra: Mapping[str, Snapshottable[Any]] | None = None,
) -> None:
    """Restore what :func:`save_machine_state` gave, into a platform built the same way.

    Raises :class:`StateError` (a ValueError) before any device changes when any part is
    missing, unknown or malformed.
    """
    devices = platform_devices(platform, extra)
    if not isinstance(state, Mapping):
        raise StateError("", f"{type(state).__name__} is not a mapping of devices", WHOLE)
    missing = sorted(set(devices) - set(state))
    if missing:
        raise StateError("", f"no state for device(s) {', '.join(missing)}", WHOLE)
    unknown = sorted(str(name) for name in set(state) - set(devices))
    if unknown:
        raise StateError("", f"state for unknown device(s) {', '.join(unknown)}", WHOLE)
    checked = {name: device.check_state(state[name]) for name, device in devices.items()}
    for name, device in devices.items():
        device.restore_state(checked[name])
