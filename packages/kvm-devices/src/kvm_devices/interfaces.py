"""The small interfaces through which devices talk to the outside world.

kvm-vmm implements them with KVM (interrupt lines, the monotonic clock, the
console); tests implement them with the fakes in :mod:`kvm_devices.testing`.
A device never imports KVM: it only sees these protocols.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar, runtime_checkable

StateT = TypeVar("StateT")


@runtime_checkable
class Device(Protocol):
    """A guest-visible register block.

    ``offset`` is relative to the start of the device's own range (the address
    map lives in the VMM); ``size`` is the access width in bytes (1, 2, 4 or 8).
    Both methods must accept any offset and size without raising: guest input
    is untrusted. Reads of nothing return all-ones for the width, as an
    undecoded bus does, unless the hardware defines otherwise.
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class InterruptLine(Protocol):
    """One interrupt request line from a device to an interrupt controller."""

    def set_level(self, level: bool) -> None:
        """Drive the line high (asserted) or low."""

    def pulse(self) -> None:
        """A rising then falling edge, for edge-triggered sources."""


class Clock(Protocol):
    """Monotonic time, in nanoseconds."""

    def now_ns(self) -> int: ...


class TimerHandle(Protocol):
    """What :meth:`Timer.schedule` returns; only ever passed back to cancel()."""


class Timer(Protocol):
    """One-shot callbacks at absolute deadlines of the matching :class:`Clock`.

    A callback runs at or after its deadline, never before, on whatever
    thread the implementation chooses; devices take their own lock if needed.
    """

    def schedule(self, deadline_ns: int, callback: Callable[[], None]) -> TimerHandle: ...

    def cancel(self, handle: TimerHandle) -> None:
        """Cancel a pending callback; cancelling a fired one is a no-op."""


class ByteSink(Protocol):
    """Where a device's output bytes go (a console, a file). Never blocks."""

    def write_bytes(self, data: bytes) -> None: ...


class ByteSource(Protocol):
    """Where a device's input bytes come from. Never blocks."""

    def read_available(self, limit: int) -> bytes:
        """Return up to ``limit`` bytes that are ready now (possibly none)."""


class IoapicSink(Protocol):
    """How the IOAPIC reaches the local APICs on a split irqchip.

    Pin ``n`` owns the reserved MSI route (GSI) ``n``. The IOAPIC reports each
    pin's MSI message whenever its redirection entry changes, and asks for the
    pin's route to be fired when the pin must deliver an interrupt.
    """

    def route_changed(self, pin: int, msi_address: int, msi_data: int, masked: bool) -> None: ...

    def deliver(self, pin: int) -> None:
        """Send the pin's current MSI message once (edge), to the LAPICs."""


class Snapshottable(Protocol[StateT]):
    """A device whose state can be saved in one process and restored in another.

    ``StateT`` is a dataclass (see :mod:`kvm_devices.snapshot`). Restoring is two steps
    so that a machine can check every device's part of a state file before it changes
    any: :meth:`check_state` only reads (it raises
    :class:`~kvm_devices.snapshot.StateError`), and :meth:`restore_state` of a state
    that passed it never fails.
    """

    def save_state(self) -> StateT:
        """A copy of the state, detached from the device."""

    def check_state(self, data: object) -> StateT:
        """The state in ``data`` (the JSON form that :meth:`save` gives), checked
        against this device's configuration too."""

    def restore_state(self, state: StateT) -> None: ...

    def save(self) -> dict[str, object]:
        """``save_state()`` in its JSON form."""

    def restore(self, data: object) -> None:
        """``restore_state(check_state(data))``."""
