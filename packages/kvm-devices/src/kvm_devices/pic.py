"""Intel 8259A programmable interrupt controllers, cascaded as on a PC.

The master sits at ports 20h-21h with its INTR output going to the CPU; the
slave sits at A0h-A1h with its INT output wired to the master's IR2. PIIX-style
edge/level control registers (ELCR) sit at 4D0h-4D1h.

Where the model deliberately leaves the datasheet:

* An edge-triggered request stays latched in IRR after its line falls, until
  the INTA cycle takes it. The datasheet wants the line held until INTA (a
  short request gives IR7); a VMM raises and drops lines as pulses.
* ICW1 also clears ISR, as QEMU and KVM do, so that re-initialising recovers a
  controller left with stale in-service bits.
* Vectors are always made 8086-style (ICW2 bits 7-3 plus the level); the
  MCS-80/85 mode of ICW4 bit 0 is recorded but has no effect.
* IRQ2 is the cascade input and has no ISA line: ``set_irq(2, ...)`` is ignored.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from kvm_devices.outbox import Outbox
from kvm_devices.snapshot import (
    Mask,
    OneOf,
    Range,
    Snapshotting,
    StateError,
    bits,
    detached,
    state_from_data,
)

ICW1_IC4 = 0x01
ICW1_SNGL = 0x02
ICW1_LTIM = 0x08
ICW1_SELECT = 0x10
OCW3_SELECT = 0x08
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10
POLL_INTERRUPT = 0x80
FLOATING_BUS = 0xFF
SPURIOUS_LEVEL = 7


@dataclass
class PicChipState:
    """Guest-visible state of one 8259A (bit n of a mask is IRn)."""

    irr: Annotated[int, bits(8)] = 0
    isr: Annotated[int, bits(8)] = 0
    imr: Annotated[int, bits(8)] = 0xFF
    lines: Annotated[int, bits(8)] = 0
    vector_base: Annotated[int, Mask(0xF8)] = 0
    lowest_priority: Annotated[int, Range(0, 7)] = 7
    read_isr: bool = False
    poll: bool = False
    special_mask: bool = False
    init_step: Annotated[int, OneOf((0, 2, 3, 4))] = 0
    expect_icw4: bool = False
    single: bool = False
    level_triggered: bool = False
    icw3: Annotated[int, bits(8)] = 0
    icw4: Annotated[int, bits(5)] = 0
    rotate_on_aeoi: bool = False
    elcr: Annotated[int, bits(8)] = 0

    def check_invariants(self) -> None:
        level = 0xFF if self.level_triggered else self.elcr
        if (self.irr ^ self.lines) & level:
            raise StateError("irr", "irr of level-triggered inputs must follow their lines")


def _power_on_master() -> PicChipState:
    return PicChipState(vector_base=0x08, icw3=0x04, icw4=0x01)


def _power_on_slave() -> PicChipState:
    return PicChipState(vector_base=0x70, icw3=0x02, icw4=0x01)


@dataclass
class PicPairState:
    """Both controllers of the pair."""

    master: PicChipState = field(default_factory=_power_on_master)
    slave: PicChipState = field(default_factory=_power_on_slave)

    def check_invariants(self) -> None:
        for name, chip, mask in (
            ("master", self.master, PicPair.MASTER_ELCR_MASK),
            ("slave", self.slave, PicPair.SLAVE_ELCR_MASK),
        ):
            if chip.elcr & ~mask:
                raise StateError(f"{name}.elcr", f"{chip.elcr:#x} sets bits outside {mask:#x}")


class _Chip:
    """The logic of one 8259A over its state; the pair does the locking."""

    def __init__(self, state: PicChipState, elcr_mask: int, is_master: bool) -> None:
        self.state = state
        self.elcr_mask = elcr_mask
        self.is_master = is_master

    def priority_order(self) -> list[int]:
        highest = (self.state.lowest_priority + 1) & 7
        return [(highest + i) & 7 for i in range(8)]

    def level_mask(self) -> int:
        return 0xFF if self.state.level_triggered else self.state.elcr

    def refresh_level_irr(self) -> None:
        s = self.state
        level = self.level_mask()
        s.irr = (s.irr & ~level) | (s.lines & level)

    def set_line(self, line: int, high: bool) -> None:
        s = self.state
        bit = 1 << line
        was_high = bool(s.lines & bit)
        s.lines = (s.lines | bit) if high else (s.lines & ~bit)
        if self.level_mask() & bit:
            s.irr = (s.irr | bit) if high else (s.irr & ~bit)
        elif high and not was_high:
            s.irr |= bit

    def nested_levels(self) -> int:
        """Levels whose own new requests pass their in-service bit (8259A SFNM)."""
        s = self.state
        if self.is_master and s.icw4 & ICW4_SFNM and not s.single:
            return s.icw3
        return 0

    def resolve(self) -> int | None:
        """The level the priority resolver would grant now, if any (8259A "Priority Resolver")."""
        s = self.state
        pending = s.irr & ~s.imr
        if s.special_mask:
            # Special mask mode: in-service levels inhibit nothing but themselves.
            for level in self.priority_order():
                if pending & ~s.isr & (1 << level):
                    return level
            return None
        nested = self.nested_levels()
        for level in self.priority_order():
            bit = 1 << level
            if s.isr & bit:
                return level if pending & nested & bit else None
            if pending & bit:
                return level
        return None

    def acknowledge(self, level: int) -> None:
        """The IRR→ISR transfer of an INTA cycle (or a poll) for ``level``."""
        s = self.state
        bit = 1 << level
        if not self.level_mask() & bit:
            s.irr &= ~bit
        if s.icw4 & ICW4_AEOI:
            if s.rotate_on_aeoi:
                s.lowest_priority = level
        else:
            s.isr |= bit

    def highest_in_service(self) -> int | None:
        s = self.state
        # Datasheet note: in special mask mode a non-specific EOI skips masked IS bits.
        candidates = s.isr & ~s.imr if s.special_mask else s.isr
        for level in self.priority_order():
            if candidates & (1 << level):
                return level
        return None

    def poll(self) -> int:
        """The byte a poll command returns (8259A "The Poll Command")."""
        self.state.poll = False
        level = self.resolve()
        if level is None:
            return 0
        self.acknowledge(level)
        return POLL_INTERRUPT | level

    def read(self, offset: int) -> int:
        s = self.state
        if s.poll:
            return self.poll()
        if offset == 1:
            return s.imr
        return s.isr if s.read_isr else s.irr

    def write(self, offset: int, value: int) -> None:
        if offset == 1:
            self.write_data(value)
        elif value & ICW1_SELECT:
            self.write_icw1(value)
        elif value & OCW3_SELECT:
            self.write_ocw3(value)
        else:
            self.write_ocw2(value)

    def write_icw1(self, value: int) -> None:
        s = self.state
        s.expect_icw4 = bool(value & ICW1_IC4)
        s.single = bool(value & ICW1_SNGL)
        s.level_triggered = bool(value & ICW1_LTIM)
        s.init_step = 2
        s.imr = 0
        s.isr = 0
        s.lowest_priority = 7
        s.special_mask = False
        s.read_isr = False
        s.poll = False
        s.rotate_on_aeoi = False
        if not s.expect_icw4:
            s.icw4 = 0
        if not self.is_master:
            s.icw3 = 7
        # Edge sense reset: lines already high must fall and rise again.
        s.irr = 0
        self.refresh_level_irr()

    def write_data(self, value: int) -> None:
        s = self.state
        if s.init_step == 2:
            s.vector_base = value & 0xF8
            s.init_step = 3 if not s.single else (4 if s.expect_icw4 else 0)
        elif s.init_step == 3:
            s.icw3 = value
            s.init_step = 4 if s.expect_icw4 else 0
        elif s.init_step == 4:
            s.icw4 = value & 0x1F
            s.init_step = 0
        else:
            s.imr = value

    def write_ocw2(self, value: int) -> None:
        s = self.state
        command = value >> 5
        named = value & 7
        if command in (0b001, 0b101):
            level = self.highest_in_service()
            if level is not None:
                s.isr &= ~(1 << level)
                if command == 0b101:
                    s.lowest_priority = level
        elif command in (0b011, 0b111):
            s.isr &= ~(1 << named)
            if command == 0b111:
                s.lowest_priority = named
        elif command == 0b110:
            s.lowest_priority = named
        elif command in (0b100, 0b000):
            s.rotate_on_aeoi = command == 0b100

    def write_ocw3(self, value: int) -> None:
        s = self.state
        if value & 0x40:
            s.special_mask = bool(value & 0x20)
        if value & 0x02:
            s.read_isr = bool(value & 0x01)
        s.poll = bool(value & 0x04)

    def write_elcr(self, value: int) -> None:
        self.state.elcr = value & self.elcr_mask
        self.refresh_level_irr()


class _ChipPorts:
    """The two I/O ports (command, data) of one controller."""

    def __init__(self, pair: PicPair, slave: bool) -> None:
        self._pair = pair
        self._slave = slave

    def read(self, offset: int, size: int) -> int:
        return self._pair._port_read(self._slave, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._pair._port_write(self._slave, offset, size, value)


class _ElcrPorts:
    """The edge/level control registers: 4D0h for IRQ0-7, 4D1h for IRQ8-15."""

    def __init__(self, pair: PicPair) -> None:
        self._pair = pair

    def read(self, offset: int, size: int) -> int:
        return self._pair._elcr_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._pair._elcr_write(offset, size, value)


@dataclass
class PicInputLine:
    """One IRQ input of the pair, as an :class:`~kvm_devices.interfaces.InterruptLine`."""

    pic: PicPair
    irq: int

    def set_level(self, level: bool) -> None:
        self.pic.set_irq(self.irq, level)

    def pulse(self) -> None:
        self.pic.set_irq(self.irq, True)
        self.pic.set_irq(self.irq, False)


def _wide_result(low_byte: int, size: int) -> int:
    """A wider access to an 8-bit port: the bytes above the port are undecoded."""
    if size <= 0:
        return 0
    return ((1 << (8 * size)) - 1) & ~0xFF | low_byte


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1 if size > 0 else 0


class PicPair(Snapshotting[PicPairState]):
    """Master and slave 8259A, as wired on a PC.

    ``intr`` is called with the master's INTR level each time it changes. The
    VMM answers a high INTR with :meth:`acknowledge` (the INTA cycle) when the
    CPU can take the interrupt. ``intr`` is called outside the lock, in order (see
    :mod:`kvm_devices.outbox`); it may call back into the pair.
    """

    MASTER_BASE = 0x20
    MASTER_LENGTH = 2
    SLAVE_BASE = 0xA0
    SLAVE_LENGTH = 2
    ELCR_BASE = 0x4D0
    ELCR_LENGTH = 2
    CASCADE_IRQ = 2
    # PIIX: IRQ0, 1, 2, 8 and 13 are edge only.
    MASTER_ELCR_MASK = 0xF8
    SLAVE_ELCR_MASK = 0xDE

    def __init__(self, intr: Callable[[bool], None]) -> None:
        self._intr = intr
        self._lock = threading.Lock()
        self._outbox = Outbox(self._lock)
        self._install(PicPairState())
        self._reported = False
        self.master_ports = _ChipPorts(self, slave=False)
        self.slave_ports = _ChipPorts(self, slave=True)
        self.elcr_ports = _ElcrPorts(self)

    def _install(self, state: PicPairState) -> None:
        self._state = state
        self._master = _Chip(state.master, self.MASTER_ELCR_MASK, is_master=True)
        self._slave = _Chip(state.slave, self.SLAVE_ELCR_MASK, is_master=False)

    # -- inputs and the INTA cycle -------------------------------------------------

    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA IRQ ``irq`` (0-15): 0-7 on the master, 8-15 on the slave."""
        if not 0 <= irq <= 15:
            raise ValueError(f"IRQ {irq} is not an input of the 8259A pair")
        if irq == self.CASCADE_IRQ:
            return
        with self._lock:
            chip = self._slave if irq >= 8 else self._master
            chip.set_line(irq & 7, level)
            self._update_cascade()
            self._report_intr_locked()
        self._outbox.flush()

    def line(self, irq: int) -> PicInputLine:
        """IRQ ``irq`` as an interrupt line, for a device to drive."""
        if not 0 <= irq <= 15:
            raise ValueError(f"IRQ {irq} is not an input of the 8259A pair")
        return PicInputLine(self, irq)

    def acknowledge(self) -> int:
        """The INTA cycle: return the vector and move the request into service."""
        with self._lock:
            vector = self._inta(commit=True)
            self._report_intr_locked()
        self._outbox.flush()
        return vector

    def pending_vector_peek(self) -> int | None:
        """The vector :meth:`acknowledge` would return now, or None if INTR is low."""
        with self._lock:
            if self._master.resolve() is None:
                return None
            return self._inta(commit=False)

    @property
    def output(self) -> bool:
        """The master's INTR output."""
        with self._lock:
            return self._master.resolve() is not None

    def _cascade_active(self) -> bool:
        s = self._master.state
        return not s.single and bool(s.icw3 & (1 << self.CASCADE_IRQ))

    def _inta(self, commit: bool) -> int:
        master_level = self._master.resolve()
        if master_level is None:
            return self._master.state.vector_base | SPURIOUS_LEVEL
        if commit:
            self._master.acknowledge(master_level)
        if master_level == self.CASCADE_IRQ and self._cascade_active():
            vector = self._slave_vector(commit)
        elif self._master.state.icw3 & (1 << master_level) and not self._master.state.single:
            # A slave declared on a level where none is wired: nobody drives the bus.
            vector = FLOATING_BUS
        else:
            vector = self._master.state.vector_base | master_level
        if commit:
            self._update_cascade()
        return vector

    def _slave_vector(self, commit: bool) -> int:
        if self._slave.state.icw3 & 7 != self.CASCADE_IRQ:
            return FLOATING_BUS
        slave_level = self._slave.resolve()
        if slave_level is None:
            # The request vanished: the slave answers IR7; the master's IS2 stays set.
            return self._slave.state.vector_base | SPURIOUS_LEVEL
        if commit:
            self._slave.acknowledge(slave_level)
            # The slave's INT falls during INTA, so a request still pending rises again.
            self._master.set_line(self.CASCADE_IRQ, False)
        return self._slave.state.vector_base | slave_level

    def _update_cascade(self) -> None:
        self._master.set_line(self.CASCADE_IRQ, self._slave.resolve() is not None)

    def _report_intr_locked(self) -> None:
        level = self._master.resolve() is not None
        if level != self._reported:
            self._reported = level
            self._outbox.post(functools.partial(self._intr, level))

    # -- ports ---------------------------------------------------------------------

    def _port_read(self, slave: bool, offset: int, size: int) -> int:
        if not 0 <= offset < 2:
            return _all_ones(size)
        with self._lock:
            chip = self._slave if slave else self._master
            value = chip.read(offset)
            self._update_cascade()
            self._report_intr_locked()
        self._outbox.flush()
        return _wide_result(value, size)

    def _port_write(self, slave: bool, offset: int, size: int, value: int) -> None:
        if not 0 <= offset < 2 or size <= 0:
            return
        with self._lock:
            chip = self._slave if slave else self._master
            chip.write(offset, value & 0xFF)
            self._update_cascade()
            self._report_intr_locked()
        self._outbox.flush()

    def _elcr_read(self, offset: int, size: int) -> int:
        if not 0 <= offset < 2:
            return _all_ones(size)
        with self._lock:
            chip = self._slave if offset else self._master
            return _wide_result(chip.state.elcr, size)

    def _elcr_write(self, offset: int, size: int, value: int) -> None:
        if not 0 <= offset < 2 or size <= 0:
            return
        with self._lock:
            chip = self._slave if offset else self._master
            chip.write_elcr(value & 0xFF)
            self._update_cascade()
            self._report_intr_locked()
        self._outbox.flush()

    # -- snapshots -----------------------------------------------------------------

    def save_state(self) -> PicPairState:
        with self._lock:
            return detached(self._state)

    def check_state(self, data: object) -> PicPairState:
        return state_from_data(PicPairState, data, "PIC")

    def restore_state(self, state: PicPairState) -> None:
        with self._lock:
            self._install(detached(state))
            self._update_cascade()
            self._report_intr_locked()
        self._outbox.flush()
