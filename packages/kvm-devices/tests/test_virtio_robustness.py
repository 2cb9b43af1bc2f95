"""Bad guest input and the lock rule for the virtio-pci function.

Guest input (any BAR0 or configuration-space access, any interrupt source from the VMM)
never raises and reads stay within their width (docs: kvm_devices.interfaces.Device). The
device lock rule (docs/architecture.md, "Device locks"): during every call the function
makes out (the interrupt sink, the backend's activate/reset/notify), another thread can
enter it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.pci import config_space as pci
from kvm_devices.testing import FakeVirtioBackend, RecordingVirtioSink
from kvm_devices.virtio import common_config as cc
from kvm_devices.virtio.constants import (
    BAR0_SIZE,
    CONFIG_SOURCE,
    F_VERSION_1,
    ISR_OFFSET,
    MSIX_TABLE_OFFSET,
    NOTIFY_OFFSET,
    REGION_SIZE,
)
from kvm_devices.virtio.pci_transport import VirtioPciFunction

REGIONS = [-REGION_SIZE, *range(0, BAR0_SIZE + REGION_SIZE, REGION_SIZE)]
offsets = st.builds(
    lambda base, delta: base + delta, st.sampled_from(REGIONS), st.integers(-4, 0x60)
)
sizes = st.sampled_from([0, 1, 2, 3, 4, 8, 16, -1])
values = st.integers(0, (1 << 64) - 1) | st.sampled_from([0, 1, 0xF, 0xFFFF, 0x8000])
# The common configuration's fields at their natural widths (and 64-bit halves), with
# small values: the paths a driver takes, reached far more often than by random bytes.
FIELDS = [
    (cc.DEVICE_FEATURE_SELECT, 4),
    (cc.DRIVER_FEATURE_SELECT, 4),
    (cc.DRIVER_FEATURE, 4),
    (cc.CONFIG_MSIX_VECTOR, 2),
    (cc.DEVICE_STATUS, 1),
    (cc.QUEUE_SELECT, 2),
    (cc.QUEUE_SIZE, 2),
    (cc.QUEUE_MSIX_VECTOR, 2),
    (cc.QUEUE_ENABLE, 2),
    (cc.QUEUE_DESC, 4),
    (cc.QUEUE_DESC + 4, 4),
    (cc.QUEUE_DRIVER, 8),
    (cc.QUEUE_DEVICE, 8),
]
common_writes = st.builds(
    lambda field, value: ("bar_write", field[0], field[1], value & ((1 << (8 * field[1])) - 1)),
    st.sampled_from(FIELDS),
    st.integers(0, 16) | st.sampled_from([0x40, 0x80, 0xFF, 0xFFFF]) | values,
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("bar_read"), offsets, sizes, st.just(0)),
        st.tuples(st.just("bar_write"), offsets, sizes, values),
        common_writes,
        common_writes,
        common_writes,
        st.tuples(st.just("config_read"), st.integers(-8, 0x108), sizes, st.just(0)),
        st.tuples(st.just("config_write"), st.integers(-8, 0x108), sizes, values),
        st.tuples(st.just("interrupt"), st.integers(-3, 4), st.just(0), st.just(0)),
        st.tuples(st.just("binding"), st.integers(-3, 4), st.just(0), st.just(0)),
    ),
    min_size=10,
    max_size=80,
)


def _width_bound(size: int) -> int:
    return 1 << (8 * size) if size > 0 else 1


@settings(max_examples=300, deadline=None)
@given(
    ops=operations,
    refuse=st.booleans(),
    needs_reset=st.booleans(),
    msix_vectors=st.integers(1, 4),
)
def test_random_accesses_never_raise(
    ops: list[tuple[str, int, int, int]], refuse: bool, needs_reset: bool, msix_vectors: int
) -> None:
    backend = FakeVirtioBackend(device_features=1 << F_VERSION_1, refuse_activation=refuse)
    sink = RecordingVirtioSink()
    function = VirtioPciFunction(
        backend, msix_vectors=msix_vectors, interrupt_sink=sink, bar0_address=0xFE00_0000
    )
    for kind, offset, size, value in ops:
        backend.needs_reset = needs_reset and kind == "interrupt"
        if kind == "bar_read":
            assert 0 <= function.bar_read(offset, size) < _width_bound(size)
        elif kind == "bar_write":
            function.bar_write(offset, size, value)
        elif kind == "config_read":
            assert 0 <= function.config.read(offset, size) < _width_bound(size)
        elif kind == "config_write":
            function.config.write(offset, size, value)
        elif kind == "interrupt":
            function.interrupt(offset)
        else:
            vector = function.binding(offset)[1]
            assert vector is None or 0 <= vector < msix_vectors
        function.notify_address(offset)
    # Whatever happened, the state saves and restores into a fresh function.
    fresh = VirtioPciFunction(
        FakeVirtioBackend(device_features=1 << F_VERSION_1),
        msix_vectors=msix_vectors,
        interrupt_sink=RecordingVirtioSink(),
    )
    fresh.restore(function.save())
    assert fresh.save() == function.save()


# -- the lock rule -----------------------------------------------------------------------

WAIT_S = 2.0


@dataclass
class Probe:
    """For each call out of the function, whether another thread could enter it."""

    function: VirtioPciFunction | None = None
    results: list[tuple[str, bool]] = field(default_factory=list)

    def check(self, name: str) -> None:
        function = self.function
        if function is None:
            return
        entered = threading.Event()

        def run() -> None:
            function.save()
            function.bar_read(ISR_OFFSET + 4, 4)
            entered.set()

        threading.Thread(target=run, daemon=True).start()
        self.results.append((name, entered.wait(WAIT_S)))


class ProbedBackend(FakeVirtioBackend):
    probe: Probe

    def activate(self, driver_features: int, queues: list[tuple[int, int, int, int, bool]]) -> None:
        self.probe.check("activate")
        super().activate(driver_features, queues)

    def reset(self) -> None:
        self.probe.check("reset")
        super().reset()

    def notify(self, queue: int) -> None:
        self.probe.check("notify")
        super().notify(queue)


class ProbedSink(RecordingVirtioSink):
    probe: Probe

    def intx(self, asserted: bool) -> None:
        self.probe.check("intx")
        super().intx(asserted)

    def msix_vector_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        self.probe.check("msix_vector_changed")
        super().msix_vector_changed(vector, address, data, masked)

    def msix_fire(self, vector: int) -> None:
        self.probe.check("msix_fire")
        super().msix_fire(vector)

    def bindings_changed(self) -> None:
        self.probe.check("bindings_changed")
        super().bindings_changed()


def test_the_function_never_calls_out_while_holding_its_lock() -> None:
    probe = Probe()
    backend = ProbedBackend(device_features=1 << F_VERSION_1, refuse_activation=True)
    sink = ProbedSink()
    backend.probe = sink.probe = probe
    function = VirtioPciFunction(
        backend, msix_vectors=2, interrupt_sink=sink, bar0_address=0xFE00_0000
    )
    probe.function = function
    function.config.write(pci.COMMAND, 2, pci.COMMAND_MEMORY)
    write = function.bar_write
    write(cc.DEVICE_STATUS, 1, 0)  # reset
    write(cc.DEVICE_STATUS, 1, 3)
    write(cc.DRIVER_FEATURE_SELECT, 4, 1)
    write(cc.DRIVER_FEATURE, 4, 1)
    write(cc.DEVICE_STATUS, 1, 0xB)
    write(cc.QUEUE_ENABLE, 2, 1)
    write(cc.DEVICE_STATUS, 1, 0xF)  # activate (refused: NEEDS_RESET, config interrupt, INTx)
    write(NOTIFY_OFFSET, 2, 0)  # notify
    function.bar_read(ISR_OFFSET, 1)  # INTx drops
    write(cc.QUEUE_MSIX_VECTOR, 2, 0)  # bindings_changed
    write(MSIX_TABLE_OFFSET, 4, 0xFEE0_0000)
    write(MSIX_TABLE_OFFSET + 12, 4, 1)
    msix_cap = function.config.read(pci.CAPABILITIES_POINTER, 1)
    function.config.write(msix_cap + 2, 2, 1 << 15)
    function.interrupt(0)  # pending
    write(MSIX_TABLE_OFFSET + 12, 4, 0)  # msix_vector_changed, then msix_fire
    function.interrupt(CONFIG_SOURCE)
    made = {name for name, _ in probe.results}
    assert made == {
        "activate",
        "reset",
        "notify",
        "intx",
        "msix_vector_changed",
        "msix_fire",
        "bindings_changed",
    }
    assert all(ok for _, ok in probe.results), probe.results
