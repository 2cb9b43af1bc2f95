"""Tests of the 8259A PIC pair model.

Section names are those of the Intel 8259A datasheet (order 231468):
"Interrupt Sequence", "Initialization Command Words" (ICW1-ICW4),
"Operation Command Words" (OCW1-OCW3), "Fully Nested Mode", "End of
Interrupt", "Automatic Rotation", "Specific Rotation", "Special Mask Mode",
"Poll Command", "Reading the 8259A Status", "Edge and Level Triggered
Modes", "Special Fully Nested Mode", "Cascade Mode". ELCR follows the Intel
82371AB (PIIX4) datasheet. Linux sequences are from arch/x86/kernel/i8259.c
(probe_8259A, init_8259A, mask_and_ack_8259A, i8259A_irq_real).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.interfaces import Device
from kvm_devices.pic import PicPair

CMD, DATA = 0, 1
MASTER_VECTOR, SLAVE_VECTOR = 0x30, 0x38


def make() -> tuple[PicPair, list[bool]]:
    events: list[bool] = []
    return PicPair(events.append), events


def linux_init(pic: PicPair, auto_eoi: bool = False, probe: bool = True) -> None:
    """probe_8259A then init_8259A, with every IRQ left masked as Linux caches it."""
    master, slave = pic.master_ports, pic.slave_ports
    slave.write(DATA, 1, 0xFF)
    master.write(DATA, 1, 0xFB)
    if probe:
        assert master.read(DATA, 1) == 0xFB, "probe_8259A reads back the mask"
    master.write(DATA, 1, 0xFF)
    master.write(CMD, 1, 0x11)
    master.write(DATA, 1, MASTER_VECTOR)
    master.write(DATA, 1, 1 << 2)
    master.write(DATA, 1, 0x03 if auto_eoi else 0x01)
    slave.write(CMD, 1, 0x11)
    slave.write(DATA, 1, SLAVE_VECTOR)
    slave.write(DATA, 1, 2)
    slave.write(DATA, 1, 0x01)
    master.write(DATA, 1, 0xFF)
    slave.write(DATA, 1, 0xFF)


def unmask(pic: PicPair, *irqs: int) -> None:
    """enable_8259A_irq: clear the IMR bit; a slave IRQ also needs the cascade IR2."""
    for irq in irqs:
        if irq >= 8:
            ports = pic.slave_ports
            ports.write(DATA, 1, ports.read(DATA, 1) & ~(1 << (irq - 8)))
            irq = 2
        ports = pic.master_ports
        ports.write(DATA, 1, ports.read(DATA, 1) & ~(1 << irq))


def linux_eoi(pic: PicPair, irq: int) -> None:
    """The EOIs of mask_and_ack_8259A: specific EOI, to the slave and to master IR2."""
    if irq >= 8:
        pic.slave_ports.write(CMD, 1, 0x60 + (irq & 7))
        pic.master_ports.write(CMD, 1, 0x62)
    else:
        pic.master_ports.write(CMD, 1, 0x60 + irq)


def isr(pic: PicPair, slave: bool = False) -> int:
    """i8259A_irq_real's read of ISR (OCW3 0x0B), then back to IRR (0x0A)."""
    ports = pic.slave_ports if slave else pic.master_ports
    ports.write(CMD, 1, 0x0B)
    value = ports.read(CMD, 1)
    ports.write(CMD, 1, 0x0A)
    return value


def irr(pic: PicPair, slave: bool = False) -> int:
    ports = pic.slave_ports if slave else pic.master_ports
    return ports.read(CMD, 1)


def raise_edge(pic: PicPair, *irqs: int) -> None:
    for irq in irqs:
        pic.set_irq(irq, True)
        pic.set_irq(irq, False)


def ready() -> PicPair:
    pic, _ = make()
    linux_init(pic)
    return pic


# ------------------------------------------------------------ initialisation and INTA


def test_linux_init_then_irq0() -> None:
    """ICW1-ICW4 as init_8259A writes them; an unmasked IRQ0 raises INTR and INTA gives 30h."""
    pic, events = make()
    linux_init(pic)
    assert events == []
    unmask(pic, 0)
    pic.set_irq(0, True)
    assert events == [True]
    assert pic.pending_vector_peek() == 0x30
    assert pic.acknowledge() == 0x30
    assert events == [True, False]
    assert isr(pic) == 0x01
    linux_eoi(pic, 0)
    assert isr(pic) == 0


def test_masked_irq_does_not_interrupt_but_shows_in_irr() -> None:
    """OCW1: a masked level is held in IRR without raising INTR."""
    pic = ready()
    pic.set_irq(4, True)
    assert not pic.output
    assert irr(pic) == 0x10
    unmask(pic, 4)
    assert pic.output


def test_linux_auto_eoi() -> None:
    """ICW4 AEOI: the INTA cycle does not set ISR, so the next request needs no EOI."""
    pic, _ = make()
    linux_init(pic, auto_eoi=True)
    unmask(pic, 0, 1)
    raise_edge(pic, 1)
    assert pic.acknowledge() == 0x31
    assert isr(pic) == 0
    raise_edge(pic, 1)
    assert pic.output
    assert pic.acknowledge() == 0x31


def test_cascade_vector_from_slave() -> None:
    """Cascade Mode: the slave's INT is IR2; INTA takes IS2 on the master and the slave's vector."""
    pic = ready()
    unmask(pic, 10)
    raise_edge(pic, 10)
    assert pic.output
    assert pic.acknowledge() == SLAVE_VECTOR + 2
    assert isr(pic) == 0x04
    assert isr(pic, slave=True) == 0x04
    assert not pic.output
    linux_eoi(pic, 10)
    assert isr(pic) == 0 and isr(pic, slave=True) == 0


def test_priority_order_fully_nested() -> None:
    """Fully Nested Mode: IR0 highest ... IR7 lowest, with IRQ8-15 at the place of IR2."""
    pic = ready()
    unmask(pic, *range(16))
    raise_edge(pic, 7, 14, 5, 3, 9, 1)
    order = []
    while pic.output:
        vector = pic.acknowledge()
        order.append(vector)
        linux_eoi(pic, vector - MASTER_VECTOR)
    assert order == [0x31, 0x39, 0x3E, 0x33, 0x35, 0x37]


def test_in_service_blocks_lower_and_equal_priority() -> None:
    """Fully Nested Mode: while IR3 is in service IR5 waits and IR1 still interrupts."""
    pic = ready()
    unmask(pic, *range(8))
    raise_edge(pic, 3)
    assert pic.acknowledge() == 0x33
    raise_edge(pic, 5, 3)
    assert not pic.output
    raise_edge(pic, 1)
    assert pic.acknowledge() == 0x31
    pic.master_ports.write(CMD, 1, 0x20)  # non-specific EOI: the highest IS bit, 1
    assert isr(pic) == 0x08
    assert not pic.output
    pic.master_ports.write(CMD, 1, 0x20)
    assert pic.acknowledge() == 0x33
    pic.master_ports.write(CMD, 1, 0x20)
    assert pic.acknowledge() == 0x35


def test_specific_eoi_clears_named_level() -> None:
    """End of Interrupt: a specific EOI resets the IS bit it names, not the highest."""
    pic = ready()
    unmask(pic, *range(8))
    raise_edge(pic, 6)
    pic.acknowledge()
    raise_edge(pic, 4)
    pic.acknowledge()
    assert isr(pic) == 0x50
    pic.master_ports.write(CMD, 1, 0x66)
    assert isr(pic) == 0x10


def test_rotate_on_non_specific_eoi() -> None:
    """Automatic Rotation: the level just served becomes the lowest priority."""
    pic = ready()
    unmask(pic, *range(8))
    raise_edge(pic, 3)
    assert pic.acknowledge() == 0x33
    pic.master_ports.write(CMD, 1, 0xA0)
    raise_edge(pic, 3, 5, 1)
    assert pic.acknowledge() == 0x35  # order is now 4 5 6 7 0 1 2 3
    pic.master_ports.write(CMD, 1, 0xA0)
    assert pic.acknowledge() == 0x31  # 5 lowest: 6 7 0 1 2 3 4 5


def test_set_priority_and_rotate_on_specific_eoi() -> None:
    """Specific Rotation: set priority (C0h|L) and rotate on specific EOI (E0h|L)."""
    pic = ready()
    unmask(pic, *range(8))
    pic.master_ports.write(CMD, 1, 0xC4)  # IR4 lowest, IR5 highest
    raise_edge(pic, 0, 4, 6)
    assert pic.acknowledge() == 0x36
    pic.master_ports.write(CMD, 1, 0xE6)  # clear IS6, IR6 lowest: 7 0 1 ... 6
    assert isr(pic) == 0
    assert pic.acknowledge() == 0x30


def test_rotate_in_automatic_eoi_mode() -> None:
    """OCW2 set/clear rotate in AEOI mode: each acknowledged level becomes the lowest."""
    pic, _ = make()
    linux_init(pic, auto_eoi=True)
    unmask(pic, *range(8))
    pic.master_ports.write(CMD, 1, 0x80)
    raise_edge(pic, 0, 1)
    assert pic.acknowledge() == 0x30
    assert pic.acknowledge() == 0x31
    raise_edge(pic, 0, 3)
    assert pic.acknowledge() == 0x33  # 1 is lowest: 2 3 ... 0 1
    pic.master_ports.write(CMD, 1, 0x00)  # clear rotate in AEOI
    raise_edge(pic, 4)
    assert pic.acknowledge() == 0x34
    raise_edge(pic, 5)
    assert pic.acknowledge() == 0x35, "3 stays lowest: 4 5 6 7 0 ..."
    assert pic.acknowledge() == 0x30


def test_special_mask_mode() -> None:
    """Special Mask Mode: masking the level in service lets lower levels through."""
    pic = ready()
    unmask(pic, *range(8))
    raise_edge(pic, 3)
    assert pic.acknowledge() == 0x33
    raise_edge(pic, 5)
    assert not pic.output
    pic.master_ports.write(DATA, 1, 0x08)  # mask IR3, in service
    pic.master_ports.write(CMD, 1, 0x68)  # ESMM|SMM: set special mask
    assert pic.output
    assert pic.acknowledge() == 0x35
    # Non-specific EOI in special mask mode skips the masked IS3.
    pic.master_ports.write(CMD, 1, 0x20)
    assert isr(pic) == 0x08
    pic.master_ports.write(CMD, 1, 0x48)  # ESMM: reset special mask
    raise_edge(pic, 6)
    pic.master_ports.write(DATA, 1, 0x00)
    assert not pic.output, "IS3 blocks IR6 again"


def test_poll_command() -> None:
    """Poll Command: the next read returns 80h|level and acknowledges it; none gives 0."""
    pic = ready()
    unmask(pic, *range(8))
    raise_edge(pic, 6)
    pic.master_ports.write(CMD, 1, 0x0C)
    assert pic.master_ports.read(CMD, 1) == 0x86
    assert isr(pic) == 0x40
    assert not pic.output
    pic.master_ports.write(CMD, 1, 0x0C)
    assert pic.master_ports.read(DATA, 1) == 0x00
    assert pic.master_ports.read(DATA, 1) == 0x00, "back to reading IMR"


def test_spurious_irq7_when_nothing_is_pending() -> None:
    """Interrupt Sequence: no request at INTA gives IR7's vector without setting IS7."""
    pic = ready()
    assert pic.acknowledge() == 0x37
    assert isr(pic) & 0x80 == 0, "i8259A_irq_real(7) sees it as spurious"


def test_spurious_irq7_when_level_request_goes_away() -> None:
    """Interrupt Sequence: a level request removed before INTA gives IR7 ("too short")."""
    pic = ready()
    pic.elcr_ports.write(0, 1, 0x20)
    unmask(pic, 5)
    pic.set_irq(5, True)
    assert pic.output
    pic.set_irq(5, False)
    assert pic.acknowledge() == 0x37
    assert isr(pic) == 0


def test_spurious_irq15_from_slave() -> None:
    """Cascade Mode: the slave's request vanishes after it raised INT: IRQ15, IS2 set on
    the master, and Linux's handling of spurious IRQ15 (EOI to both) clears it."""
    pic = ready()
    unmask(pic, 12)
    raise_edge(pic, 12)
    assert pic.output
    pic.slave_ports.write(DATA, 1, 0xFF)  # disable_irq(12) before the CPU took it
    assert pic.acknowledge() == SLAVE_VECTOR + 7
    assert isr(pic, slave=True) & 0x80 == 0, "i8259A_irq_real(15) sees it as spurious"
    assert isr(pic) == 0x04
    linux_eoi(pic, 15)
    assert isr(pic) == 0
    assert not pic.output


def test_sfnm_lets_higher_slave_request_through() -> None:
    """Special Fully Nested Mode: with IS2 set, a higher slave request still reaches the CPU."""
    for icw4, expect in ((0x11, True), (0x01, False)):
        pic = ready()
        pic.master_ports.write(CMD, 1, 0x11)
        pic.master_ports.write(DATA, 1, MASTER_VECTOR)
        pic.master_ports.write(DATA, 1, 0x04)
        pic.master_ports.write(DATA, 1, icw4)
        unmask(pic, 12, 9)
        raise_edge(pic, 12)
        assert pic.acknowledge() == SLAVE_VECTOR + 4
        raise_edge(pic, 9)
        assert pic.output is expect
        if expect:
            assert pic.acknowledge() == SLAVE_VECTOR + 1
            assert isr(pic, slave=True) == 0x12


def test_slave_eoi_reraises_pending_request() -> None:
    """Cascade Mode: after EOI to both, a slave request that waited is delivered."""
    pic = ready()
    unmask(pic, 9, 12)
    raise_edge(pic, 12)
    assert pic.acknowledge() == SLAVE_VECTOR + 4
    raise_edge(pic, 13)  # masked on the slave: never
    raise_edge(pic, 12)  # IS4 blocks it on the slave
    assert not pic.output
    linux_eoi(pic, 12)
    assert pic.acknowledge() == SLAVE_VECTOR + 4


# ------------------------------------------------------------ triggering


def test_elcr_masks_are_piix() -> None:
    """ELCR: IRQ0, 1, 2, 8 and 13 are edge only (masks F8h and DEh)."""
    pic = ready()
    pic.elcr_ports.write(0, 1, 0xFF)
    pic.elcr_ports.write(1, 1, 0xFF)
    assert pic.elcr_ports.read(0, 1) == 0xF8
    assert pic.elcr_ports.read(1, 1) == 0xDE
    assert pic.elcr_ports.read(0, 2) == 0xFFF8
    assert pic.elcr_ports.read(2, 1) == 0xFF


def test_level_triggered_request_follows_line() -> None:
    """Edge and Level Triggered Modes: a level request repeats while the line stays high."""
    pic = ready()
    pic.elcr_ports.write(1, 1, 0x08)  # IRQ11 level
    unmask(pic, 11)
    pic.set_irq(11, True)
    assert pic.acknowledge() == SLAVE_VECTOR + 3
    linux_eoi(pic, 11)
    assert pic.output, "still asserted after EOI"
    assert pic.acknowledge() == SLAVE_VECTOR + 3
    pic.set_irq(11, False)
    linux_eoi(pic, 11)
    assert not pic.output
    assert irr(pic, slave=True) == 0


def test_edge_triggered_request_needs_new_rising_edge() -> None:
    """Edge and Level Triggered Modes: a line held high interrupts once."""
    pic = ready()
    unmask(pic, 4)
    pic.set_irq(4, True)
    assert pic.acknowledge() == 0x34
    linux_eoi(pic, 4)
    pic.set_irq(4, True)
    assert not pic.output
    pic.set_irq(4, False)
    assert not pic.output
    pic.set_irq(4, True)
    assert pic.acknowledge() == 0x34


def test_edge_request_latched_after_line_falls() -> None:
    """A pulse (rise then fall before INTA) is kept in IRR, unlike the bare 8259A."""
    pic = ready()
    unmask(pic, 3)
    pic.line(3).pulse()
    assert irr(pic) == 0x08
    assert pic.acknowledge() == 0x33


def test_ltim_makes_all_inputs_level() -> None:
    """ICW1 LTIM: every input of that controller is level triggered, ELCR or not."""
    pic = ready()
    master = pic.master_ports
    master.write(CMD, 1, 0x19)
    master.write(DATA, 1, MASTER_VECTOR)
    master.write(DATA, 1, 0x04)
    master.write(DATA, 1, 0x01)
    master.write(DATA, 1, 0xFE)
    pic.set_irq(0, True)
    assert pic.acknowledge() == 0x30
    linux_eoi(pic, 0)
    assert pic.output
    pic.set_irq(0, False)
    assert not pic.output


def test_icw1_resets_state() -> None:
    """ICW1: IMR cleared, IR7 lowest, special mask off, status read = IRR, edge sense reset."""
    pic = ready()
    master = pic.master_ports
    unmask(pic, *range(8))
    pic.set_irq(6, True)
    pic.acknowledge()
    master.write(CMD, 1, 0xC3)  # IR3 lowest
    master.write(CMD, 1, 0x6B)  # special mask, read ISR
    master.write(DATA, 1, 0x55)
    master.write(CMD, 1, 0x11)
    assert master.read(DATA, 1) == 0x00
    master.write(DATA, 1, MASTER_VECTOR)
    master.write(DATA, 1, 0x04)
    master.write(DATA, 1, 0x01)
    assert master.read(DATA, 1) == 0x00
    assert master.read(CMD, 1) == 0x00, "reads IRR; IR6 (still high) is not a new edge"
    assert not pic.output
    raise_edge(pic, 5, 1)
    assert pic.acknowledge() == 0x31, "IR7 lowest again"


def test_single_mode_skips_icw3() -> None:
    """ICW1 SNGL: ICW3 is not expected; ICW1 without IC4 needs no ICW4 either."""
    pic, _ = make()
    master = pic.master_ports
    master.write(CMD, 1, 0x12)  # single, no ICW4
    master.write(DATA, 1, 0x50)
    master.write(DATA, 1, 0xFD)  # now OCW1
    assert master.read(DATA, 1) == 0xFD
    pic.set_irq(1, True)
    assert pic.acknowledge() == 0x51


def test_intr_reported_on_change_only() -> None:
    """INTR: the callback sees each change of the master's output once."""
    pic, events = make()
    linux_init(pic, auto_eoi=True)
    unmask(pic, 0, 1, 8)
    raise_edge(pic, 1, 0, 8)
    assert events == [True]
    assert pic.acknowledge() == 0x30
    assert events == [True], "IRQ1 and IRQ8 keep INTR high"
    pic.master_ports.write(DATA, 1, 0xFF)
    assert events == [True, False]


def test_reentrant_callback_may_acknowledge() -> None:
    """The INTR callback runs outside the lock: it may run the INTA cycle itself."""
    vectors: list[int] = []
    levels: list[bool] = []
    pic_box: list[PicPair] = []

    def intr(level: bool) -> None:
        levels.append(level)
        if level:
            vectors.append(pic_box[0].acknowledge())

    pic = PicPair(intr)
    pic_box.append(pic)
    linux_init(pic, auto_eoi=True)
    unmask(pic, 0, 1)
    raise_edge(pic, 1)
    assert vectors == [0x31]
    assert levels == [True, False]


def test_concurrent_raisers_and_acknowledger_do_not_deadlock() -> None:
    """Thread safety: vCPU-like and device-like threads together end consistent."""
    pic = ready()
    unmask(pic, *range(16))
    pic.master_ports.write(CMD, 1, 0x11)
    for value in (MASTER_VECTOR, 0x04, 0x03):
        pic.master_ports.write(DATA, 1, value)
    unmask(pic, *range(16))

    def raiser(irq: int) -> None:
        for _ in range(300):
            raise_edge(pic, irq)

    threads = [threading.Thread(target=raiser, args=(irq,)) for irq in (1, 4, 10)]
    for thread in threads:
        thread.start()
    for _ in range(300):
        vector = pic.acknowledge()
        if vector >= SLAVE_VECTOR:
            linux_eoi(pic, vector - MASTER_VECTOR)
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert pic.output == (pic.pending_vector_peek() is not None)


def test_wide_and_undecoded_accesses() -> None:
    """Package convention: a wider access acts on the byte at its offset; the rest is FFh."""
    pic = ready()
    assert all(isinstance(p, Device) for p in (pic.master_ports, pic.slave_ports, pic.elcr_ports))
    assert (PicPair.MASTER_BASE, PicPair.SLAVE_BASE, PicPair.ELCR_BASE) == (0x20, 0xA0, 0x4D0)
    assert pic.master_ports.read(DATA, 2) == 0xFFFF
    pic.master_ports.write(DATA, 4, 0x12345600)
    assert pic.master_ports.read(DATA, 1) == 0x00
    assert pic.master_ports.read(2, 1) == 0xFF
    assert pic.master_ports.read(7, 8) == (1 << 64) - 1
    pic.slave_ports.write(5, 1, 0x00)
    assert pic.slave_ports.read(DATA, 1) == 0xFF


def test_peek_has_no_side_effects() -> None:
    pic = ready()
    unmask(pic, 10)
    raise_edge(pic, 10)
    before = pic.save()
    assert pic.pending_vector_peek() == SLAVE_VECTOR + 2
    assert pic.save() == before


# ------------------------------------------------------------ snapshots


def test_save_restore_round_trip() -> None:
    """Snapshots: save→restore→save is identical and the copy acknowledges the same."""
    pic = ready()
    unmask(pic, 3, 12)
    pic.elcr_ports.write(1, 1, 0x10)
    pic.set_irq(12, True)
    raise_edge(pic, 3)
    snapshot = pic.save()
    twin, events = make()
    twin.restore(snapshot)
    assert twin.save() == snapshot
    assert events == [True]
    assert [twin.acknowledge(), twin.acknowledge()] == [pic.acknowledge(), pic.acknowledge()]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("slave"),
        lambda s: s["master"].update(irr=256),
        lambda s: s["master"].update(lowest_priority=8),
        lambda s: s["master"].update(init_step=1),
        lambda s: s["master"].update(vector_base=0x31),
        lambda s: s["master"].update(elcr=0x04),
        lambda s: s["slave"].update(poll=1),
        lambda s: s["slave"].update(elcr=0x10, lines=0x10, irr=0),
        lambda s: s["slave"].update(extra=0),
    ],
)
def test_restore_rejects_malformed(mutate: Callable[[dict[str, object]], object]) -> None:
    pic = ready()
    snapshot = pic.save()
    mutate(snapshot)
    with pytest.raises(ValueError):
        pic.restore(snapshot)


# ------------------------------------------------------------ fuzz

Op = tuple[str, int, int, int]
SIZES = st.sampled_from([1, 2, 4, 8])
PORTS = ("master", "slave", "elcr")
OPS = st.one_of(
    st.tuples(st.sampled_from(PORTS), st.integers(0, 6), SIZES, st.integers(0, (1 << 64) - 1)),
    st.tuples(st.sampled_from(PORTS), st.integers(0, 6), SIZES, st.just(-1)),
    st.tuples(st.just("irq"), st.integers(0, 15), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("inta"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("init"), st.integers(0, 1), st.just(0), st.just(0)),
)


def apply(pic: PicPair, op: Op) -> int | None:
    kind, a, b, c = op
    if kind == "irq":
        pic.set_irq(a, bool(b))
    elif kind == "inta":
        return pic.acknowledge()
    elif kind == "init":
        linux_init(pic, auto_eoi=bool(a), probe=False)
        pic.master_ports.write(DATA, 1, 0)
        pic.slave_ports.write(DATA, 1, 0)
    else:
        ports: dict[str, Device] = {
            "master": pic.master_ports,
            "slave": pic.slave_ports,
            "elcr": pic.elcr_ports,
        }
        if c < 0:
            return ports[kind].read(a, b)
        ports[kind].write(a, b, c)
    return None


@settings(max_examples=200, deadline=None)
@given(st.lists(OPS, max_size=50), st.lists(OPS, max_size=30))
def test_fuzz_never_raises_and_restores_identically(before: list[Op], after: list[Op]) -> None:
    """Any access sequence: no exception, reads fit their width, vectors are bytes, INTR
    reports alternate and match the output, and a restored twin behaves identically."""
    pic, events = make()
    for op in before:
        result = apply(pic, op)
        if result is not None:
            assert 0 <= result < 1 << (8 * (op[2] if op[0] in PORTS else 1))
        assert pic.output == (pic.pending_vector_peek() is not None)
        assert all(x != y for x, y in itertools.pairwise(events))
        assert bool(events and events[-1]) == pic.output
    snapshot = pic.save()
    twin, twin_events = make()
    twin.restore(snapshot)
    assert twin.save() == snapshot
    assert bool(twin_events and twin_events[-1]) == twin.output
    for op in after:
        assert apply(pic, op) == apply(twin, op)
    assert twin.save() == pic.save()
    assert twin.output == pic.output
