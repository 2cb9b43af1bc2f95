"""The one snapshot validator (kvm_devices.snapshot) and every device's JSON round trip.

A state file is host input read in another process: every malformed value must be
refused with a StateError naming the device, the field path and the problem, before
anything changes.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.acpi_pm import AcpiPm
from kvm_devices.debug_exit import DebugExit
from kvm_devices.fw_cfg import FwCfg
from kvm_devices.i8042 import I8042
from kvm_devices.interfaces import Snapshottable
from kvm_devices.ioapic import Ioapic
from kvm_devices.pc_testdev import PcTestdev
from kvm_devices.pci.config_space import PciConfigSpace
from kvm_devices.pci.host_bridge import PciHost
from kvm_devices.pci.msix import MsixTable
from kvm_devices.pic import PicPair
from kvm_devices.pit import Pit
from kvm_devices.reset_port import ResetPort
from kvm_devices.rtc import Rtc
from kvm_devices.snapshot import (
    Length,
    Mask,
    OneOf,
    Range,
    StateError,
    bits,
    state_from_data,
    state_to_data,
)
from kvm_devices.testing import (
    MemorySink,
    RecordingIoapicSink,
    RecordingLine,
    VirtualClock,
)
from kvm_devices.uart import Uart16550


class Colour(enum.Enum):
    RED = 1
    BLUE = "blue"


@dataclass
class Inner:
    byte: Annotated[int, bits(8)] = 0
    flags: Annotated[int, Mask(0x0F)] = 0

    def check_invariants(self) -> None:
        if self.byte == 0xEE:
            raise StateError("byte", "0xee is reserved")


@dataclass
class Sample:
    number: Annotated[int, Range(-1, 10)] = 0
    flag: bool = False
    blob: Annotated[bytes, Length(4)] = bytes(4)
    queue: Annotated[list[Annotated[int, bits(4)]], Length(most=3)] = field(default_factory=list)
    pins: Annotated[list[bool], Length(2)] = field(default_factory=lambda: [False, False])
    triple: tuple[int, bool, str] = (0, False, "")
    maybe: Annotated[int, OneOf((1, 2))] | None = None
    colour: Colour = Colour.RED
    inner: Inner = field(default_factory=Inner)
    inners: list[Inner] = field(default_factory=list)


def good() -> dict[str, object]:
    return state_to_data(Sample())


def refused(change: Callable[[dict[str, object]], object]) -> StateError:
    data = good()
    change(data)
    with pytest.raises(StateError) as caught:
        state_from_data(Sample, data, "sample")
    return caught.value


def test_the_json_form_round_trips_every_kind_of_field() -> None:
    sample = Sample(
        number=-1,
        flag=True,
        blob=b"\x00\xab\xff\x10",
        queue=[1, 15],
        pins=[True, False],
        triple=(7, True, "x"),
        maybe=2,
        colour=Colour.BLUE,
        inner=Inner(0x80, 0x0F),
        inners=[Inner(1, 2), Inner(3, 4)],
    )
    data = state_to_data(sample)
    assert data["blob"] == "00abff10"
    assert data["triple"] == [7, True, "x"]
    assert data["colour"] == "blue"
    assert data["inner"] == {"byte": 0x80, "flags": 0x0F}
    assert state_from_data(Sample, json.loads(json.dumps(data)), "sample") == sample


@pytest.mark.parametrize(
    ("change", "path", "problem"),
    [
        (lambda d: d.update(number=True), "number", "True is not int"),
        (lambda d: d.update(number="3"), "number", "'3' is not int"),
        (lambda d: d.update(flag=1), "flag", "1 is not bool"),
        (lambda d: d.update(number=11), "number", "outside [-0x1, 0xa]"),
        (lambda d: d.update(maybe=3), "maybe", "3 is not one of [1, 2]"),
        (lambda d: d.update(blob="00ab"), "blob", "has 2 items, not 4"),
        (lambda d: d.update(blob="zz" * 4), "blob", "hex digits"),
        (lambda d: d.update(blob=b"\0" * 4), "blob", "is not a hex string"),
        (lambda d: d.update(queue=[1, 2, 3, 4]), "queue", "more than 3"),
        (lambda d: d.update(queue=[1, 16]), "queue[1]", "0x10 is outside [0x0, 0xf]"),
        (lambda d: d.update(queue=5), "queue", "5 is not a list"),
        (lambda d: d.update(pins=[True]), "pins", "has 1 items, not 2"),
        (lambda d: d.update(triple=[1, True]), "triple", "has 2 items, not 3"),
        (lambda d: d.update(triple=[1, True, 2]), "triple[2]", "2 is not str"),
        (lambda d: d.update(colour="green"), "colour", "'green' is not a Colour"),
        (lambda d: d.update(colour=True), "colour", "True is not a Colour"),
        (lambda d: d.pop("flag"), "<top>", "missing field(s) flag"),
        (lambda d: d.update(extra=0), "<top>", "unknown field(s) extra"),
        (lambda d: d.update(inner={"byte": 0x100, "flags": 0}), "inner.byte", "0x100"),
        (lambda d: d.update(inner={"byte": 1, "flags": 0x10}), "inner.flags", "outside 0xf"),
        (lambda d: d.update(inner={"byte": 1}), "inner", "missing field(s) flags"),
        (lambda d: d.update(inner=[1, 0]), "inner", "is not a mapping of Inner"),
        (
            lambda d: d.update(inners=[{"byte": 1, "flags": 0}, {"byte": 0xEE, "flags": 0}]),
            "inners[1].byte",
            "0xee is reserved",
        ),
        (lambda d: d.update(inner={"byte": 0xEE, "flags": 0}), "inner.byte", "reserved"),
    ],
)
def test_each_malformed_value_is_named_by_device_path_and_problem(
    change: Callable[[dict[str, object]], object], path: str, problem: str
) -> None:
    error = refused(change)
    assert isinstance(error, ValueError)
    assert error.device == "sample"
    assert error.path == path.replace("<top>", "")
    assert problem in error.problem
    assert str(error).startswith(f"sample state: {path}: ")


def test_a_state_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(StateError, match=r"^PIC state: <top>: \[\] is not a mapping"):
        PicPair(lambda level: None).check_state([])


def test_device_configuration_checks_name_the_device() -> None:
    small = Ioapic(RecordingIoapicSink(), pins=4)
    big = Ioapic(RecordingIoapicSink(), pins=24)
    with pytest.raises(StateError, match=r"^IOAPIC state: redirection: has 24 pins, not 4"):
        small.check_state(big.save())
    fw_cfg = FwCfg(1 << 30, 1)
    with pytest.raises(StateError, match=r"^fw_cfg state: offset: 5 is past"):
        fw_cfg.check_state({"selector": 0, "offset": 5})


def test_nested_device_paths() -> None:
    clock = VirtualClock()
    pit = Pit(clock, clock, RecordingLine())
    data = pit.save()
    counters = data["counters"]
    assert isinstance(counters, list)
    counters[1]["access"] = 0
    with pytest.raises(StateError, match=r"^PIT state: counters\[1\]\.access: 0x0 is outside"):
        pit.check_state(data)
    pic = PicPair(lambda level: None)
    data = pic.save()
    master = data["master"]
    assert isinstance(master, dict)
    master["elcr"] = 0x01
    with pytest.raises(StateError, match=r"^PIC state: master\.elcr: 0x1 sets bits outside"):
        pic.check_state(data)


# -- every device, through JSON --------------------------------------------------------


def busy_devices() -> list[tuple[str, Callable[[], Snapshottable[Any]]]]:
    """Factories of every device, each driven into a state other than power-on."""

    def pic() -> Snapshottable[Any]:
        device = PicPair(lambda level: None)
        device.master_ports.write(1, 1, 0x00)
        device.set_irq(1, True)
        return device

    def pit() -> Snapshottable[Any]:
        clock = VirtualClock(5_000_000)
        device = Pit(clock, clock, RecordingLine())
        for value in (0x34, 0xA9, 0x04):
            device.write(3 if value == 0x34 else 0, 1, value)
        clock.advance(3_000_000)
        device.port61.write(0, 1, 0x03)
        return device

    def ioapic() -> Snapshottable[Any]:
        device = Ioapic(RecordingIoapicSink())
        device.write(0, 4, 0x10 + 2 * 3)
        device.write(0x10, 4, 0x8031)
        device.set_irq(3, True)
        return device

    def uart() -> Snapshottable[Any]:
        device = Uart16550(RecordingLine(), MemorySink())
        device.write(2, 1, 0x01)
        device.receive(bytes(range(40)))
        return device

    def rtc() -> Snapshottable[Any]:
        clock = VirtualClock()
        device = Rtc(clock, clock, RecordingLine(), wall_time_ns=lambda: 1_700_000_000 * 10**9)
        device.write(0, 1, 0x0B)
        device.write(1, 1, 0x42)
        return device

    def i8042() -> Snapshottable[Any]:
        device = I8042(lambda: None, RecordingLine(), RecordingLine())
        device.keyboard_input([0x1C, 0xF0, 0x1C])
        device.command_port.write(0, 1, 0xAA)
        return device

    def acpi_pm() -> Snapshottable[Any]:
        clock = VirtualClock()
        device = AcpiPm(clock, clock, RecordingLine(), lambda sleep_type: None)
        device.pm1_event_ports.write(2, 2, 0x0101)
        clock.advance(1_000_000)
        return device

    def testdev() -> Snapshottable[Any]:
        device = PcTestdev(lambda irq, level: None)
        device.iomem.write(0x42, 8, 0x1122_3344_5566_7788)
        device.irq_ports.write(5, 1, 1)
        return device

    def reset_port() -> Snapshottable[Any]:
        device = ResetPort(lambda: None)
        device.write(0, 1, 0x0A)
        return device

    def fw_cfg() -> Snapshottable[Any]:
        device = FwCfg(1 << 30, 2, files={"etc/x": b"hello"})
        device.write(0, 2, 0x20)
        device.read(1, 1)
        return device

    def debug_exit() -> Snapshottable[Any]:
        return DebugExit(lambda status: None)

    def pci_config() -> Snapshottable[Any]:
        device = pci_function()
        device.write(0x10, 8, 0x1_C000_0000)
        device.write(0x04, 2, 0x0406)
        device.write(0x3C, 1, 10)
        return device

    def msix() -> Snapshottable[Any]:
        device = msix_table()
        device.table_write(0, 8, 0xFEE0_1000)
        device.table_write(0x18, 8, 0x1_0000_0041)
        device.write_capability(0, 2, 0x8000)
        device.signal(1)
        return device

    def pci_host() -> Snapshottable[Any]:
        device = PciHost(ResetPort(lambda: None))
        device.config_ports.write(0, 4, 0x8000_0004)
        device.config_ports.write(4, 2, 0x0006)
        return device

    return [
        ("pic", pic),
        ("pit", pit),
        ("ioapic", ioapic),
        ("uart", uart),
        ("rtc", rtc),
        ("i8042", i8042),
        ("acpi_pm", acpi_pm),
        ("pc_testdev", testdev),
        ("reset_port", reset_port),
        ("fw_cfg", fw_cfg),
        ("debug_exit", debug_exit),
        ("pci_config", pci_config),
        ("msix", msix),
        ("pci_host", pci_host),
    ]


@pytest.mark.parametrize(("name", "factory"), busy_devices())
def test_every_device_state_survives_json(
    name: str, factory: Callable[[], Snapshottable[Any]]
) -> None:
    device = factory()
    saved = device.save()
    text = json.dumps(saved, sort_keys=True)
    fresh = fresh_devices()[name]()
    if name != "debug_exit":  # the one device without state
        assert fresh.save() != saved
    fresh.restore(json.loads(text))
    assert json.dumps(fresh.save(), sort_keys=True) == text
    assert fresh.save_state() == device.save_state()


def fresh_devices() -> dict[str, Callable[[], Snapshottable[Any]]]:
    # The busy PIT's clock stands at 8 ms; its ticks are saved absolute.
    clock = VirtualClock(8_000_000)
    return {
        "pic": lambda: PicPair(lambda level: None),
        "pit": lambda: Pit(clock, clock, RecordingLine()),
        "ioapic": lambda: Ioapic(RecordingIoapicSink()),
        "uart": lambda: Uart16550(RecordingLine(), MemorySink()),
        "rtc": lambda: Rtc(clock, clock, RecordingLine(), wall_time_ns=lambda: 0),
        "i8042": lambda: I8042(lambda: None, RecordingLine(), RecordingLine()),
        "acpi_pm": lambda: AcpiPm(clock, clock, RecordingLine(), lambda sleep_type: None),
        "pc_testdev": lambda: PcTestdev(lambda irq, level: None),
        "reset_port": lambda: ResetPort(lambda: None),
        "fw_cfg": lambda: FwCfg(1 << 30, 2, files={"etc/x": b"hello"}),
        "debug_exit": lambda: DebugExit(lambda status: None),
        "pci_config": pci_function,
        "msix": msix_table,
        "pci_host": lambda: PciHost(ResetPort(lambda: None)),
    }


def msix_table() -> MsixTable:
    return MsixTable(3, 0, 0x4000, 0, 0x5000, RecordingMsixSink())


class RecordingMsixSink:
    def __init__(self) -> None:
        self.events: list[tuple[int, ...]] = []

    def vector_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        self.events.append((vector, address, data, masked))

    def fire(self, vector: int) -> None:
        self.events.append((vector,))


def pci_function() -> PciConfigSpace:
    device = PciConfigSpace(vendor_id=0x1AF4, device_id=0x1042, class_code=0x010000)
    device.add_memory_bar(0, 0x8000)
    return device


@pytest.mark.parametrize(("name", "factory"), busy_devices())
def test_a_refused_state_changes_nothing(
    name: str, factory: Callable[[], Snapshottable[Any]]
) -> None:
    device = factory()
    before = device.save()
    with pytest.raises(StateError) as caught:
        device.restore({**before, "not_a_field": 0})
    assert "not_a_field" in str(caught.value)
    assert device.save() == before


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(data: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every place inside a JSON value: dict keys and list indexes, outermost first."""
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data[:40]):  # enough of the 64 KiB / 128-byte lists
            found += _paths(value, (*prefix, index))
    return found


def _replace(data: object, path: tuple[object, ...], value: object) -> None:
    *parents, last = path
    for step in parents:
        data = data[step]  # type: ignore[index]
    data[last] = value  # type: ignore[index]


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_a_corrupt_state_is_refused_with_a_state_error_or_restores_cleanly(
    data: st.DataObject,
) -> None:
    """A foreign file: any JSON value anywhere in any device's state gives a StateError
    (never another exception), or a state that restores without raising."""
    name, factory = data.draw(st.sampled_from(busy_devices()))
    device = factory()
    state = json.loads(json.dumps(device.save()))
    places = _paths(state)
    if places:
        _replace(state, data.draw(st.sampled_from(places)), data.draw(json_values))
    else:
        state = data.draw(json_values)
    target = fresh_devices()[name]()
    try:
        checked = target.check_state(state)
    except StateError:
        return
    target.restore_state(checked)
