"""An exit port for test guests, like QEMU's ``isa-debug-exit`` (hw/misc/debugexit.c).

A guest ends the VM by writing a value ``v`` to the port; the VMM is told the exit status
``(v << 1) | 1``, so a guest can never report a plain success (0) by accident, exactly as
QEMU exits with that code.

Behaviour, following QEMU's device:

* Any write, of any width, at any offset inside the range, calls ``on_exit`` once with
  ``(v << 1) | 1`` where ``v`` is the written value truncated to the access width.
  Writes at offsets past the range are undecoded and ignored.
* Reads return all-ones of the access width (QEMU's device has no read handler, so the
  port reads as an undecoded one).

The device holds no guest-visible state; :class:`DebugExitState` is empty so that it
snapshots like every other device. ``on_exit`` is called with no lock held, so it may do
anything, including tearing the VM down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvm_devices.snapshot import Snapshotting, state_from_data


@dataclass
class DebugExitState:
    """The port has no state of its own."""


class DebugExit(Snapshotting[DebugExitState]):
    """The ``isa-debug-exit`` port: writes end the VM with status ``(v << 1) | 1``."""

    BASE = 0xF4
    """QEMU's conventional ``iobase`` for kvm-unit-tests."""
    SIZE = 4
    """QEMU's conventional ``iosize`` for kvm-unit-tests."""

    def __init__(self, on_exit: Callable[[int], None], size: int = SIZE) -> None:
        if size < 1:
            raise ValueError(f"debug-exit size must be at least 1, not {size}")
        self._on_exit = on_exit
        self._size = size

    def read(self, offset: int, size: int) -> int:
        return _all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        if not 0 <= offset < self._size or size < 1:
            return
        self._on_exit(((value & _all_ones(size)) << 1) | 1)

    def save_state(self) -> DebugExitState:
        return DebugExitState()

    def check_state(self, data: object) -> DebugExitState:
        return state_from_data(DebugExitState, data, "debug-exit")

    def restore_state(self, state: DebugExitState) -> None:
        """Nothing to restore: the port has no state."""


def _all_ones(size: int) -> int:
    return (1 << (8 * max(size, 0))) - 1
