"""Intel 82093AA I/O APIC, as a split-irqchip IOAPIC in front of KVM's local APICs.

References: Intel 82093AA I/O Advanced Programmable Interrupt Controller datasheet
(order 290566-001), section 3 "Register description"; the EOI register at offset 0x40
(IOAPIC version 0x20) from the Intel ICH/PCH datasheets ("EOI Register", write-only).

Pin ``n`` owns the reserved MSI route (GSI) ``n`` of the VMM. The IOAPIC never sends a
message itself: it reports each pin's MSI address/data to :class:`IoapicSink` whenever
the redirection entry changes the message or the mask, and asks the sink to fire the
route when the pin must deliver.

Choices where the datasheet is silent or the brief asked to choose:

* ``set_irq(pin, level)`` takes the *electrical* level of the input (True = high). The
  polarity bit (13, Interrupt Input Pin Polarity, 1 = low active, 82093AA §3.2.4) says
  which level asserts the pin: ISA lines are active high, PCI INTx# lines active low
  (PCI Local Bus Spec 3.0 §2.2.6). Edge-triggered pins deliver on the asserting edge;
  level-triggered pins deliver, and re-deliver on EOI, while asserted. Every input is
  low at power-on, as an undriven line reads here: whoever owns a line that idles high
  (a PCI INTx# pull-up) drives it high once.
* Rewriting the polarity of an edge-triggered pin whose line stands still delivers
  nothing: only a moving line makes an edge (the datasheet does not say; KVM and QEMU
  ignore the bit). On a level-triggered pin the new polarity takes effect at once.
* A rising edge on a masked edge-triggered pin is lost, not latched (82093AA §3.2.4,
  Interrupt Mask: "Edge-sensitive interrupts signaled on a masked interrupt pin are
  ignored (i.e., not delivered or held pending)"; QEMU's ioapic.c does the same).
* Reads of an indirect register that does not exist return 0xFFFFFFFF, as KVM's
  in-kernel IOAPIC does (``ioapic_read_indirect``); the datasheet does not say.
* IOWIN and the EOI register act only on 4-byte accesses; narrower IOWIN reads return 0
  and narrower writes are ignored (QEMU's ``ioapic_mem_read``/``ioapic_mem_write``).
  IOREGSEL accepts any width (its low 8 bits are significant). An 8-byte access is two
  4-byte accesses at ``offset`` and ``offset + 4``. Other offsets are undecoded: reads
  return all-ones, writes are ignored.
* Switching an entry to edge trigger clears its Remote IRR (QEMU and KVM do so; Linux's
  ``__eoi_ioapic_pin`` relies on it on IOAPICs without an EOI register).
* Interrupt-storm guard (QEMU's ``SUCCESSIVE_IRQ_MAX_COUNT``): after
  :attr:`Ioapic.STORM_LIMIT` back-to-back re-deliveries of a still-asserted level pin on
  EOI, the next re-delivery waits :attr:`Ioapic.STORM_RETRY_DELAY_NS` on the timer
  (10 ms, the delay QEMU and KVM use). Without a timer and clock the pin instead keeps
  Remote IRR set until its line changes level or its entry is rewritten.

Thread-safety: one lock guards the state. Sink calls are made after it is released, in
the order the state changed (:mod:`kvm_devices.outbox`), so the sink sees routes and
deliveries in the order they happened and may call back into this IOAPIC.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Annotated

from kvm_devices.interfaces import Clock, IoapicSink, Timer, TimerHandle
from kvm_devices.outbox import Outbox
from kvm_devices.snapshot import (
    Mask,
    Range,
    Snapshotting,
    StateError,
    bits,
    detached,
    state_from_data,
)

REG_ID = 0x00
REG_VERSION = 0x01
REG_ARBITRATION = 0x02
REG_REDIRECTION_BASE = 0x10

RTE_VECTOR = 0xFF
RTE_DELIVERY_MODE_SHIFT = 8
RTE_DELIVERY_MODE = 0x7 << RTE_DELIVERY_MODE_SHIFT
RTE_DEST_MODE_SHIFT = 11
RTE_DEST_MODE = 1 << RTE_DEST_MODE_SHIFT
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_TRIGGER_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_DEST_SHIFT = 56
# Bits the guest may write (82093AA §3.2.4); bits 17-55 are reserved and read as 0.
RTE_WRITABLE = (
    RTE_VECTOR
    | RTE_DELIVERY_MODE
    | RTE_DEST_MODE
    | RTE_POLARITY
    | RTE_TRIGGER_LEVEL
    | RTE_MASKED
    | (0xFF << RTE_DEST_SHIFT)
)
RTE_RESET = RTE_MASKED

# The MSI address format (Intel SDM vol. 3A §11.11.1): bits 31-20 are 0xFEE whatever the
# platform, so this is no board address.
MSI_ADDRESS_BASE = 0xFEE0_0000
MSI_DEST_SHIFT = 12
MSI_DEST_MODE_SHIFT = 2
MSI_DELIVERY_MODE_SHIFT = 8
MSI_TRIGGER_LEVEL = 1 << 15

ID_SHIFT = 24
ID_MASK = 0xF

_DWORD = 0xFFFF_FFFF
STORM_LIMIT = 10_000


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1 if size > 0 else 0


def msi_message(entry: int) -> tuple[int, int]:
    """The MSI (address, data) a redirection entry sends, as KVM's MSI routes expect."""
    dest = (entry >> RTE_DEST_SHIFT) & 0xFF
    dest_mode = (entry >> RTE_DEST_MODE_SHIFT) & 1
    delivery_mode = (entry >> RTE_DELIVERY_MODE_SHIFT) & 0x7
    address = MSI_ADDRESS_BASE | (dest << MSI_DEST_SHIFT) | (dest_mode << MSI_DEST_MODE_SHIFT)
    data = (entry & RTE_VECTOR) | (delivery_mode << MSI_DELIVERY_MODE_SHIFT)
    # The kernel builds its EOI-exit bitmap from level routes: without bit 15 no
    # KVM_EXIT_IOAPIC_EOI would ever reach us and Remote IRR would stick.
    if entry & RTE_TRIGGER_LEVEL:
        data |= MSI_TRIGGER_LEVEL
    return address, data


@dataclass
class IoapicState:
    """Everything the guest can observe, plus the storm guard's bookkeeping."""

    ioregsel: Annotated[int, bits(8)] = 0
    apic_id: Annotated[int, Range(0, ID_MASK)] = 0
    redirection: list[Annotated[int, Mask(RTE_WRITABLE | RTE_REMOTE_IRR)]] = field(
        default_factory=list
    )
    # Each input's electrical level (True = high), whatever the polarity bit makes of it.
    line_high: list[bool] = field(default_factory=list)
    # Back-to-back re-deliveries on EOI of a still-asserted level pin.
    storm_counts: list[Annotated[int, Range(0, STORM_LIMIT - 1)]] = field(default_factory=list)
    # Pins whose Remote IRR is held set by the storm guard (no timer available).
    storm_held: list[bool] = field(default_factory=list)
    # Absolute deadline of the delayed re-delivery, if one is pending.
    retry_deadline_ns: int | None = None

    def check_invariants(self) -> None:
        for pin, entry in enumerate(self.redirection):
            if entry & RTE_REMOTE_IRR and not entry & RTE_TRIGGER_LEVEL:
                raise StateError(f"redirection[{pin}]", "Remote IRR set on an edge-triggered entry")
        pins = len(self.redirection)
        for name in ("line_high", "storm_counts", "storm_held"):
            if len(getattr(self, name)) != pins:
                raise StateError(name, f"must have one item per pin ({pins})")


class Ioapic(Snapshotting[IoapicState]):
    """An 82093AA-compatible IOAPIC with ``pins`` inputs, version 0x20 (with EOI register)."""

    SIZE = 0x1000

    IOREGSEL = 0x00
    IOWIN = 0x10
    EOI = 0x40

    VERSION = 0x20
    MAX_PINS = 120  # redirection registers 0x10..0xFF

    STORM_LIMIT = STORM_LIMIT
    STORM_RETRY_DELAY_NS = 10_000_000

    def __init__(
        self,
        sink: IoapicSink,
        timer: Timer | None = None,
        clock: Clock | None = None,
        pins: int = 24,
    ) -> None:
        if not 1 <= pins <= self.MAX_PINS:
            raise ValueError(f"an IOAPIC has 1..{self.MAX_PINS} pins, not {pins}")
        self._sink = sink
        self._timer = timer
        self._clock = clock
        self._pins = pins
        self._lock = threading.Lock()
        self._outbox = Outbox(self._lock)
        self._state = self._reset_state(pins)
        self._retry_handle: TimerHandle | None = None
        # Identifies the live retry timer, so that a callback already past
        # cancel() when a newer timer replaced it does nothing.
        self._retry_generation = 0
        self._reported: list[tuple[int, int, bool] | None] = [None] * pins
        self.report_all_routes()

    @property
    def pins(self) -> int:
        return self._pins

    @staticmethod
    def _reset_state(pins: int) -> IoapicState:
        return IoapicState(
            redirection=[RTE_RESET] * pins,
            line_high=[False] * pins,
            storm_counts=[0] * pins,
            storm_held=[False] * pins,
        )

    # ----------------------------------------------------------------- MMIO

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if size == 8:
                value = self._read32(offset, 4) | (self._read32(offset + 4, 4) << 32)
            elif size not in (1, 2, 4):
                value = _all_ones(size)
            else:
                value = self._read32(offset, size)
        self._outbox.flush()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if size == 8:
                self._write32(offset, 4, value & _DWORD)
                self._write32(offset + 4, 4, (value >> 32) & _DWORD)
            elif size in (1, 2, 4):
                self._write32(offset, size, value & _all_ones(size))
        self._outbox.flush()

    def _read32(self, offset: int, size: int) -> int:
        if offset == self.IOREGSEL:
            return self._state.ioregsel & _all_ones(size)
        if offset == self.IOWIN:
            return self._read_indirect() if size == 4 else 0
        if offset == self.EOI:
            return 0  # write-only register
        return _all_ones(size)

    def _write32(self, offset: int, size: int, value: int) -> None:
        if offset == self.IOREGSEL:
            self._state.ioregsel = value & 0xFF
        elif offset == self.IOWIN and size == 4:
            self._write_indirect(value)
        elif offset == self.EOI and size == 4:
            self._eoi_locked(value & 0xFF)

    def _read_indirect(self) -> int:
        select = self._state.ioregsel
        if select in (REG_ID, REG_ARBITRATION):
            # The arbitration ID is loaded from the APIC ID (82093AA §3.2.3).
            return self._state.apic_id << ID_SHIFT
        if select == REG_VERSION:
            return self.VERSION | ((self._pins - 1) << 16)
        pin = (select - REG_REDIRECTION_BASE) >> 1
        if select >= REG_REDIRECTION_BASE and pin < self._pins:
            entry = self._state.redirection[pin]
            return (entry >> 32) & _DWORD if select & 1 else entry & _DWORD
        return _DWORD

    def _write_indirect(self, value: int) -> None:
        select = self._state.ioregsel
        if select == REG_ID:
            self._state.apic_id = (value >> ID_SHIFT) & ID_MASK
            return
        pin = (select - REG_REDIRECTION_BASE) >> 1
        if select < REG_REDIRECTION_BASE or pin >= self._pins:
            return  # version, arbitration and absent registers are read-only
        old = self._state.redirection[pin]
        high_half = bool(select & 1)
        written = ((old & _DWORD) | (value << 32)) if high_half else ((old & ~_DWORD) | value)
        entry = (written & RTE_WRITABLE) | (old & RTE_REMOTE_IRR)
        if not entry & RTE_TRIGGER_LEVEL:
            entry &= ~RTE_REMOTE_IRR
        self._state.redirection[pin] = entry
        self._state.storm_counts[pin] = 0
        if self._state.storm_held[pin]:
            # Rewriting the entry is how a guest recovers a stuck pin; let it.
            self._state.storm_held[pin] = False
            self._state.redirection[pin] &= ~RTE_REMOTE_IRR
        self._report_route(pin, force=False)
        self._service_level(pin)

    # ------------------------------------------------------- interrupt inputs

    def set_irq(self, pin: int, level: bool) -> None:
        """Drive input ``pin`` to the electrical ``level`` (True = high).

        Whether that asserts the pin is the polarity bit's business.
        """
        if not 0 <= pin < self._pins:
            raise ValueError(f"IOAPIC pin {pin} out of range 0..{self._pins - 1}")
        with self._lock:
            state = self._state
            if state.line_high[pin] == level:
                return
            state.line_high[pin] = level
            state.storm_counts[pin] = 0
            if state.storm_held[pin]:
                state.storm_held[pin] = False
                state.redirection[pin] &= ~RTE_REMOTE_IRR
            entry = state.redirection[pin]
            if entry & RTE_TRIGGER_LEVEL:
                self._service_level(pin)
            elif self._asserted(pin) and not entry & RTE_MASKED:
                self._outbox.post(functools.partial(self._sink.deliver, pin))
        self._outbox.flush()

    def eoi(self, vector: int) -> None:
        """An EOI broadcast for ``vector`` (KVM_EXIT_IOAPIC_EOI or the EOI register)."""
        with self._lock:
            self._eoi_locked(vector & 0xFF)
        self._outbox.flush()

    def _eoi_locked(self, vector: int) -> None:
        state = self._state
        for pin in range(self._pins):
            entry = state.redirection[pin]
            if (entry & RTE_VECTOR) != vector or not entry & RTE_TRIGGER_LEVEL:
                continue
            if not entry & RTE_REMOTE_IRR or state.storm_held[pin]:
                continue
            state.redirection[pin] = entry & ~RTE_REMOTE_IRR
            if entry & RTE_MASKED or not self._asserted(pin):
                state.storm_counts[pin] = 0
                continue
            state.storm_counts[pin] += 1
            if state.storm_counts[pin] < self.STORM_LIMIT:
                self._deliver_level(pin)
                continue
            state.storm_counts[pin] = 0
            if self._timer is not None and self._clock is not None:
                self._schedule_retry(self._clock.now_ns() + self.STORM_RETRY_DELAY_NS)
            else:
                state.redirection[pin] |= RTE_REMOTE_IRR
                state.storm_held[pin] = True

    def _asserted(self, pin: int) -> bool:
        low_active = bool(self._state.redirection[pin] & RTE_POLARITY)
        return self._state.line_high[pin] != low_active

    def _service_level(self, pin: int) -> None:
        entry = self._state.redirection[pin]
        if (
            entry & RTE_TRIGGER_LEVEL
            and not entry & (RTE_MASKED | RTE_REMOTE_IRR)
            and self._asserted(pin)
        ):
            self._state.storm_counts[pin] = 0
            self._deliver_level(pin)

    def _deliver_level(self, pin: int) -> None:
        self._state.redirection[pin] |= RTE_REMOTE_IRR
        self._outbox.post(functools.partial(self._sink.deliver, pin))

    # ------------------------------------------------------------ storm timer

    def _schedule_retry(self, deadline_ns: int) -> None:
        assert self._timer is not None
        pending = self._state.retry_deadline_ns
        if pending is not None and pending <= deadline_ns and self._retry_handle is not None:
            return
        if self._retry_handle is not None:
            self._timer.cancel(self._retry_handle)
        self._state.retry_deadline_ns = deadline_ns
        self._retry_generation += 1
        generation = self._retry_generation
        self._retry_handle = self._timer.schedule(deadline_ns, lambda: self._retry_due(generation))

    def _retry_due(self, generation: int) -> None:
        with self._lock:
            if generation == self._retry_generation:
                self._retry_due_locked()
        self._outbox.flush()

    def _retry_due_locked(self) -> None:
        self._retry_handle = None
        self._state.retry_deadline_ns = None
        for pin in range(self._pins):
            self._service_level(pin)

    # ----------------------------------------------------------------- routes

    def report_all_routes(self) -> None:
        """Report every pin's MSI route to the sink, changed or not (VMM re-sync)."""
        with self._lock:
            self._report_all_routes_locked()
        self._outbox.flush()

    def _report_all_routes_locked(self) -> None:
        for pin in range(self._pins):
            self._report_route(pin, force=True)

    def _report_route(self, pin: int, force: bool) -> None:
        entry = self._state.redirection[pin]
        address, data = msi_message(entry)
        route = (address, data, bool(entry & RTE_MASKED))
        if force or self._reported[pin] != route:
            self._reported[pin] = route
            self._outbox.post(functools.partial(self._sink.route_changed, pin, *route))

    # --------------------------------------------------------------- snapshot

    def save_state(self) -> IoapicState:
        with self._lock:
            return detached(self._state)

    def check_state(self, data: object) -> IoapicState:
        state = state_from_data(IoapicState, data, "IOAPIC")
        if len(state.redirection) != self._pins:
            raise StateError(
                "redirection", f"has {len(state.redirection)} pins, not {self._pins}", "IOAPIC"
            )
        return state

    def restore_state(self, state: IoapicState) -> None:
        """Restore, then report every pin's route: the routes live outside (in KVM)."""
        restored = detached(state)
        with self._lock:
            if self._retry_handle is not None and self._timer is not None:
                self._timer.cancel(self._retry_handle)
            self._retry_handle = None
            self._retry_generation += 1
            self._state = restored
            # Routes first: a delivery fires the pin's route, which must be the restored one.
            self._report_all_routes_locked()
            deadline = restored.retry_deadline_ns
            if deadline is not None:
                if self._timer is not None and self._clock is not None:
                    restored.retry_deadline_ns = None
                    self._schedule_retry(deadline)
                else:
                    # No timer to wait on: retry now rather than leave the pin stuck.
                    self._retry_due_locked()
        self._outbox.flush()
