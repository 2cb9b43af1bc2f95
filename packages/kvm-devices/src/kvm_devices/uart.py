"""National Semiconductor PC16550D (16550A) UART on a "virtual wire".

Reference: PC16550D Universal Asynchronous Receiver/Transmitter with FIFOs datasheet
(National Semiconductor / TI, SNLS378), section 8 "Registers": 8.1 LCR, 8.2 divisor
latches, 8.4 LSR, 8.5 FCR, 8.6 IIR (table IV, interrupt priorities), 8.7 IER, 8.8 MCR,
8.9 MSR, 8.10 SCR; table II "UART reset configuration".

What a virtual wire changes (as in QEMU's and crosvm's serial models):

* A byte written to THR goes straight to the :class:`ByteSink`; the transmitter is never
  busy, so LSR.THRE and LSR.TEMT always read 1 and the THRE interrupt is raised again at
  once (the line drops while THR is written and rises again, giving the PIC an edge).
* Host input (:meth:`Uart16550.receive`, :meth:`Uart16550.poll_input`) is never lost:
  what does not fit in the receiver (16 bytes with FIFOs, 1 without) waits in an
  unbounded host backlog and moves into the FIFO as the guest drains it. Only loopback
  traffic can overrun the FIFO (LSR.OE), as on the chip.
* The character timeout indication (IIR 0xC) is approximated as "FIFOs on, receiver data
  interrupt enabled, and the FIFO holds data below its trigger level": the four character
  times of silence the chip waits for have always elapsed from the guest's point of view.
* Parity, framing and break never occur; the baud-rate divisor is stored only. The wire
  carries whole bytes whatever the LCR word length (as QEMU's and crosvm's do), so a
  guest that writes THR without programming LCR (reset: 5 bits) still gets its text out.
* The modem inputs outside loopback read as CTS, DSR and DCD asserted, RI not.
* On a PC the IRQ is gated by the OUT2 output (MCR bit 3) through a tri-state buffer. In
  loopback mode the chip forces its output pins inactive (§8.8), so the IRQ line is also
  low then; the IRQ line is "interrupt pending AND OUT2 AND NOT LOOP".
* Wider port accesses are split into byte accesses at consecutive offsets, as the ISA
  bridge does for an 8-bit device; bytes outside the 8-port range read 0xFF.

Thread-safety: one lock guards the state. The interrupt line and the byte sink are called
after it is released, in the order the state changed (:mod:`kvm_devices.outbox`), so they
see levels and bytes in order and may call back into this UART. The byte source is read
with the lock held: it never blocks and never calls into a device.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from dataclasses import dataclass, field
from typing import Annotated

from kvm_devices.interfaces import ByteSink, ByteSource, InterruptLine
from kvm_devices.outbox import Outbox
from kvm_devices.snapshot import (
    Length,
    Mask,
    Range,
    Snapshotting,
    StateError,
    bits,
    detached,
    state_from_data,
)

# Register offsets (DLAB = LCR bit 7 selects the divisor latch at 0 and 1).
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RX_DATA = 0x01
IER_THRE = 0x02
IER_LINE_STATUS = 0x04
IER_MODEM_STATUS = 0x08
IER_WRITABLE = 0x0F

IIR_NO_INTERRUPT = 0x01
IIR_LINE_STATUS = 0x06
IIR_RX_DATA = 0x04
IIR_CHAR_TIMEOUT = 0x0C
IIR_THRE = 0x02
IIR_MODEM_STATUS = 0x00
IIR_FIFOS_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_DMA_MODE = 0x08
FCR_TRIGGER_SHIFT = 6
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_WRITABLE = 0x1F

LSR_DATA_READY = 0x01
LSR_OVERRUN = 0x02
LSR_PARITY = 0x04
LSR_FRAMING = 0x08
LSR_BREAK = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OVERRUN | LSR_PARITY | LSR_FRAMING | LSR_BREAK

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
# What a virtual modem presents outside loopback: ready to talk, no ring.
MSR_IDLE_INPUTS = MSR_CTS | MSR_DSR | MSR_DCD

FIFO_DEPTH = 16


@dataclass
class UartState:
    """Guest-visible registers and buffers.

    ``host_backlog`` is only meaningful in snapshots: the live backlog is kept in a
    queue with cheap pops from the front.
    """

    ier: Annotated[int, Mask(IER_WRITABLE)] = 0
    lcr: Annotated[int, bits(8)] = 0
    mcr: Annotated[int, Mask(MCR_WRITABLE)] = 0
    scr: Annotated[int, bits(8)] = 0
    divisor: Annotated[int, bits(16)] = 0
    fifo_enabled: bool = False
    fifo_trigger_bits: Annotated[int, Range(0, len(RX_TRIGGER_LEVELS) - 1)] = 0
    dma_mode: bool = False
    line_errors: Annotated[int, Mask(LSR_ERRORS)] = 0
    msr_deltas: Annotated[int, Mask(MSR_DCTS | MSR_DDSR | MSR_TERI | MSR_DDCD)] = 0
    thre_pending: bool = False
    rx_fifo: Annotated[list[Annotated[int, bits(8)]], Length(most=FIFO_DEPTH)] = field(
        default_factory=list
    )
    host_backlog: bytes = b""

    def check_invariants(self) -> None:
        if not self.fifo_enabled and len(self.rx_fifo) > 1:
            raise StateError("rx_fifo", "holds more than one byte with the FIFOs off")


class _ByteQueue:
    """A FIFO of bytes with amortised O(1) pops from the front."""

    def __init__(self, data: bytes = b"") -> None:
        self._buffer = bytearray(data)
        self._head = 0

    def __len__(self) -> int:
        return len(self._buffer) - self._head

    def extend(self, data: bytes) -> None:
        self._buffer += data

    def pop(self, count: int) -> bytes:
        taken = bytes(self._buffer[self._head : self._head + count])
        self._head += len(taken)
        if self._head > 4096 and self._head * 2 > len(self._buffer):
            del self._buffer[: self._head]
            self._head = 0
        return taken

    def snapshot(self) -> bytes:
        return bytes(self._buffer[self._head :])


class Uart16550(Snapshotting[UartState]):
    """One 16550A UART occupying eight I/O ports."""

    SIZE = 8
    COM1 = 0x3F8
    COM2 = 0x2F8
    COM3 = 0x3E8
    COM4 = 0x2E8
    COM1_IRQ = 4
    COM2_IRQ = 3
    COM3_IRQ = 4
    COM4_IRQ = 3
    # (base port, ISA IRQ) of the four conventional PC serial ports.
    PC_PORTS = ((COM1, COM1_IRQ), (COM2, COM2_IRQ), (COM3, COM3_IRQ), (COM4, COM4_IRQ))

    def __init__(
        self,
        irq: InterruptLine,
        output: ByteSink,
        input: ByteSource | None = None,
    ) -> None:
        self._irq = irq
        self._output = output
        self._input = input
        self._lock = threading.Lock()
        self._outbox = Outbox(self._lock)
        self._state = UartState()
        self._backlog = _ByteQueue()
        self._irq_level = False

    # ------------------------------------------------------------ port access

    def read(self, offset: int, size: int) -> int:
        if not 1 <= size <= 8:
            return (1 << (8 * size)) - 1 if size > 0 else 0
        with self._lock:
            value = 0
            for index in range(size):
                value |= self._read_byte(offset + index) << (8 * index)
        self._outbox.flush()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if not 1 <= size <= 8:
            return
        with self._lock:
            for index in range(size):
                self._write_byte(offset + index, (value >> (8 * index)) & 0xFF)
        self._outbox.flush()

    def _read_byte(self, offset: int) -> int:
        state = self._state
        dlab = bool(state.lcr & LCR_DLAB)
        if offset == RBR_THR_DLL:
            return state.divisor & 0xFF if dlab else self._read_rbr()
        if offset == IER_DLM:
            return state.divisor >> 8 if dlab else state.ier
        if offset == IIR_FCR:
            return self._read_iir()
        if offset == LCR:
            return state.lcr
        if offset == MCR:
            return state.mcr
        if offset == LSR:
            return self._read_lsr()
        if offset == MSR:
            return self._read_msr()
        if offset == SCR:
            return state.scr
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        state = self._state
        dlab = bool(state.lcr & LCR_DLAB)
        if offset == RBR_THR_DLL:
            if dlab:
                state.divisor = (state.divisor & 0xFF00) | value
            else:
                self._write_thr(value)
        elif offset == IER_DLM:
            if dlab:
                state.divisor = (state.divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            state.lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            state.scr = value
        # LSR and MSR are read-only (§8.4: writing LSR is for factory test only).

    # -------------------------------------------------------------- registers

    def _read_rbr(self) -> int:
        fifo = self._state.rx_fifo
        value = fifo.pop(0) if fifo else 0
        self._refill_from_host()
        if self._input is not None:
            self._pull_source()
        self._update_irq()
        return value

    def _write_thr(self, value: int) -> None:
        state = self._state
        character = value
        state.thre_pending = False
        self._update_irq()
        if state.mcr & MCR_LOOP:
            if len(state.rx_fifo) < self._rx_capacity():
                state.rx_fifo.append(character)
            else:
                # §8.4 bit 1: without FIFOs the new character overwrites RBR; with
                # FIFOs it is lost in the shift register and the FIFO is kept.
                state.line_errors |= LSR_OVERRUN
                if not state.fifo_enabled:
                    state.rx_fifo[0] = character
        else:
            self._outbox.post(functools.partial(self._output.write_bytes, bytes((character,))))
        state.thre_pending = True
        self._update_irq()

    def _write_ier(self, value: int) -> None:
        state = self._state
        new = value & IER_WRITABLE
        if (state.ier ^ new) & IER_THRE:
            # Enabling the THRE interrupt with THR empty raises it at once (QEMU does
            # this too; Linux's UART_BUG_THRE probe in serial8250_do_startup relies on it).
            state.thre_pending = bool(new & IER_THRE)
        state.ier = new
        self._update_irq()

    def _read_iir(self) -> int:
        state = self._state
        source = self._pending_source()
        if source == IIR_THRE:
            state.thre_pending = False
            self._update_irq()
        return source | (IIR_FIFOS_ENABLED if state.fifo_enabled else 0)

    def _write_fcr(self, value: int) -> None:
        state = self._state
        enable = bool(value & FCR_ENABLE)
        if enable != state.fifo_enabled:
            # §8.5: changing between FIFO and 16450 mode clears the FIFOs.
            state.rx_fifo.clear()
            state.fifo_enabled = enable
        if enable:
            # The other bits are programmed only while bit 0 is written as 1.
            if value & FCR_CLEAR_RX:
                state.rx_fifo.clear()
            state.fifo_trigger_bits = value >> FCR_TRIGGER_SHIFT
            state.dma_mode = bool(value & FCR_DMA_MODE)
        self._refill_from_host()
        self._update_irq()

    def _read_lsr(self) -> int:
        state = self._state
        value = state.line_errors | LSR_THRE | LSR_TEMT
        if state.rx_fifo:
            value |= LSR_DATA_READY
        state.line_errors = 0
        self._update_irq()
        return value

    def _write_mcr(self, value: int) -> None:
        state = self._state
        before = self._modem_inputs()
        state.mcr = value & MCR_WRITABLE
        after = self._modem_inputs()
        changed = before ^ after
        if changed & MSR_CTS:
            state.msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            state.msr_deltas |= MSR_DDSR
        if before & MSR_RI and not after & MSR_RI:
            state.msr_deltas |= MSR_TERI
        if changed & MSR_DCD:
            state.msr_deltas |= MSR_DDCD
        self._refill_from_host()
        self._update_irq()

    def _read_msr(self) -> int:
        state = self._state
        value = self._modem_inputs() | state.msr_deltas
        state.msr_deltas = 0
        self._update_irq()
        return value

    def _modem_inputs(self) -> int:
        mcr = self._state.mcr
        if not mcr & MCR_LOOP:
            return MSR_IDLE_INPUTS
        # §8.8 loopback: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
        inputs = 0
        if mcr & MCR_DTR:
            inputs |= MSR_DSR
        if mcr & MCR_RTS:
            inputs |= MSR_CTS
        if mcr & MCR_OUT1:
            inputs |= MSR_RI
        if mcr & MCR_OUT2:
            inputs |= MSR_DCD
        return inputs

    # ------------------------------------------------------------ interrupts

    def _pending_source(self) -> int:
        """The IIR interrupt identification, by the priorities of §8.6 table IV."""
        state = self._state
        ier = state.ier
        if ier & IER_LINE_STATUS and state.line_errors:
            return IIR_LINE_STATUS
        if ier & IER_RX_DATA and state.rx_fifo:
            if not state.fifo_enabled or len(state.rx_fifo) >= self._trigger_level():
                return IIR_RX_DATA
            return IIR_CHAR_TIMEOUT
        if ier & IER_THRE and state.thre_pending:
            return IIR_THRE
        if ier & IER_MODEM_STATUS and state.msr_deltas:
            return IIR_MODEM_STATUS
        return IIR_NO_INTERRUPT

    def _update_irq(self, force: bool = False) -> None:
        mcr = self._state.mcr
        level = (
            self._pending_source() != IIR_NO_INTERRUPT
            and bool(mcr & MCR_OUT2)
            and not mcr & MCR_LOOP
        )
        if force or level != self._irq_level:
            self._irq_level = level
            self._outbox.post(functools.partial(self._irq.set_level, level))

    # ----------------------------------------------------------------- input

    def receive(self, data: bytes) -> None:
        """Host input arriving on the serial line. Never blocks, never drops."""
        if not data:
            return
        with self._lock:
            self._backlog.extend(data)
            self._refill_from_host()
            self._update_irq()
        self._outbox.flush()

    def poll_input(self) -> int:
        """Take what the ByteSource has ready, up to what the receiver can hold now.

        Returns the number of bytes taken. The VMM calls this when its source becomes
        readable; reads of RBR also pull from the source as the guest drains the FIFO.
        """
        if self._input is None:
            return 0
        with self._lock:
            taken = self._pull_source()
            self._update_irq()
        self._outbox.flush()
        return taken

    def _pull_source(self) -> int:
        assert self._input is not None
        room = self._rx_capacity() - len(self._state.rx_fifo) - len(self._backlog)
        if room <= 0 or self._state.mcr & MCR_LOOP:
            return 0
        data = self._input.read_available(room)[:room]
        self._backlog.extend(data)
        self._refill_from_host()
        return len(data)

    def _refill_from_host(self) -> None:
        state = self._state
        if state.mcr & MCR_LOOP:
            return  # §8.8: the serial input is disconnected in loopback
        room = self._rx_capacity() - len(state.rx_fifo)
        if room > 0 and len(self._backlog):
            state.rx_fifo.extend(self._backlog.pop(room))

    def _rx_capacity(self) -> int:
        return FIFO_DEPTH if self._state.fifo_enabled else 1

    def _trigger_level(self) -> int:
        return RX_TRIGGER_LEVELS[self._state.fifo_trigger_bits]

    # --------------------------------------------------------------- snapshot

    def save_state(self) -> UartState:
        with self._lock:
            return detached(dataclasses.replace(self._state, host_backlog=self._backlog.snapshot()))

    def check_state(self, data: object) -> UartState:
        return state_from_data(UartState, data, "UART")

    def restore_state(self, state: UartState) -> None:
        restored = detached(state)
        with self._lock:
            self._backlog = _ByteQueue(restored.host_backlog)
            restored.host_backlog = b""
            self._state = restored
            self._update_irq(force=True)
        self._outbox.flush()
