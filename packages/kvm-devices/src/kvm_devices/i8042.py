"""Intel 8042 keyboard controller with a PS/2 keyboard behind it and no mouse.

References: IBM PS/2 Hardware Interface Technical Reference, "Keyboard/Auxiliary Device
Controller" (status register, command byte, controller commands, output port) and
"Keyboard" (keyboard commands and responses); Linux drivers/input/serio/i8042.c and
libps2.c for how a guest probes it.

Two ports, each its own :class:`~kvm_devices.interfaces.Device`: ``data_port`` (0x60) and
``command_port`` (0x64; reads give the status register). Only the byte at offset 0 of
each is decoded: wider reads return that byte with all-ones above it, wider writes act
on their low byte.

Model:

* One output buffer byte (status OBF), fed first from the controller's own replies
  (command results, D2/D3 echoes, "no device" answers) and then from the keyboard's
  queue; keyboard bytes move only while the keyboard interface is enabled (command byte
  bit 4 clear). The input buffer is never full (status IBF always 0): every write is
  taken at once.
* IRQ1 is high while a keyboard-side byte waits in the output buffer and command byte
  bit 0 is set; IRQ12 likewise for an auxiliary-side byte and bit 1. Taking a byte
  drops the line; when another byte follows at once the line goes low then high again,
  so an edge-triggered PIC sees one edge per byte.
* Translation (command byte bit 6): keyboard bytes pass through the 8042's fixed scan
  code set 2 to set 1 table, and a 0xF0 break prefix is swallowed and sets bit 7 of the
  following byte. ``keyboard_input`` takes set-2 bytes, what a PS/2 keyboard sends.
* No auxiliary device: the controller's auxiliary port exists (loop-back command 0xD3
  and interface test 0xA9 work, so Linux registers the port), but a byte sent to the
  device with 0xD4 is answered by the controller with 0xFE and the timeout status bit,
  which Linux's psmouse takes as an immediate error instead of waiting out its timeout.
* The reset line: output-port bit 0 written as 0 (command 0xD1) or pulsed low (0xF0-0xFF
  with bit 0 clear, 0xFE being the usual one) calls ``reset_request``.

Thread-safety: one lock guards the state. The interrupt lines and ``reset_request`` are
called after it is released, in the order the state changed (:mod:`kvm_devices.outbox`),
so two vCPUs racing on the ports cannot leave a line at a stale level, and a line or
``reset_request`` may call back into this controller or do anything else.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated

from kvm_devices.interfaces import InterruptLine
from kvm_devices.outbox import Outbox
from kvm_devices.snapshot import (
    Length,
    OneOf,
    Range,
    Snapshotting,
    StateError,
    bits,
    detached,
    state_from_data,
)

# Status register (IBM PS/2 TR, "Status Register").
STATUS_OBF = 0x01
STATUS_IBF = 0x02
STATUS_SYS = 0x04
STATUS_CMD = 0x08
STATUS_UNLOCKED = 0x10
STATUS_AUX_OBF = 0x20
STATUS_TIMEOUT = 0x40
STATUS_PARITY = 0x80

# Controller command byte, RAM byte 0 (IBM PS/2 TR, "Controller Command Byte").
CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYS = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_TRANSLATE = 0x40
CTR_AFTER_POST = CTR_KBD_INT | CTR_SYS | CTR_TRANSLATE
"""What a PC BIOS leaves in the command byte; the model starts there."""

# Output port (IBM PS/2 TR, "Output Port Definition").
OUT_RESET = 0x01
"""0 holds the system in reset."""
OUT_A20 = 0x02
OUT_KBD_OBF = 0x10
OUT_AUX_OBF = 0x20
OUT_AT_POWER_ON = 0xCF
"""Reset and A20 high, clock and data lines idle high, no output-buffer bits."""

INPUT_PORT = 0x80
"""Input port: bit 7 = keyboard not inhibited (keylock open); no jumpers set."""

# Controller commands (written to 0x64).
CMD_READ_RAM = 0x20  # 0x20-0x3F: read RAM byte (0x20 = command byte)
CMD_WRITE_RAM = 0x60  # 0x60-0x7F: write RAM byte (0x60 = command byte)
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_INPUT = 0xC0
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_WRITE_KBD_OBUF = 0xD2
CMD_WRITE_AUX_OBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_PULSE_FIRST = 0xF0

_COMMANDS_WITH_DATA = (CMD_WRITE_OUTPUT, CMD_WRITE_KBD_OBUF, CMD_WRITE_AUX_OBUF, CMD_WRITE_AUX)

SELF_TEST_PASSED = 0x55
INTERFACE_OK = 0x00

# Keyboard commands and replies (IBM PS/2 TR, "Keyboard": "Commands from the System").
KBD_SET_LEDS = 0xED
KBD_ECHO = 0xEE
KBD_SCAN_SET = 0xF0
KBD_IDENTIFY = 0xF2
KBD_TYPEMATIC = 0xF3
KBD_ENABLE = 0xF4
KBD_DISABLE = 0xF5
KBD_DEFAULTS = 0xF6
KBD_RESET = 0xFF
KBD_ACK = 0xFA
KBD_BAT_OK = 0xAA
KBD_ID = (0xAB, 0x83)
NAK = 0xFE
BREAK_PREFIX = 0xF0

KEYBOARD_QUEUE_LIMIT = 16
"""A PS/2 keyboard buffers 16 bytes while the host holds its clock low."""
CONTROLLER_QUEUE_LIMIT = 16
RAM_BYTES = 32
DEFAULT_TYPEMATIC = 0x2B
"""10.9 characters per second after 500 ms, the keyboard's power-on default."""

# The 8042's fixed set-2 to set-1 translation of bytes 0x00-0x7F (IBM PS/2 TR, "Keyboard
# Scan-Code Set 2", system scan codes after translation). It is the inverse of Linux's
# atkbd_unxlate_table, except that 0x00 (keyboard error/overrun) becomes 0xFF.
_TRANSLATE_LOW = bytes.fromhex(
    "ff 43 41 3f 3d 3b 3c 58 64 44 42 40 3e 0f 29 59"
    "65 38 2a 70 1d 10 02 5a 66 71 2c 1f 1e 11 03 5b"
    "67 2e 2d 20 12 05 04 5c 68 39 2f 21 14 13 06 5d"
    "69 31 30 23 22 15 07 5e 6a 72 32 24 16 08 09 5f"
    "6b 33 25 17 18 0b 0a 60 6c 34 35 26 27 19 0c 61"
    "6d 73 28 74 1a 0d 62 6e 3a 36 1c 1b 75 2b 63 76"
    "55 56 77 78 79 7a 0e 7b 7c 4f 7d 4b 47 7e 7f 6f"
    "52 53 50 4c 4d 48 01 45 57 4e 51 4a 37 49 46 54"
)
# Above 0x7F only F7 (set 2: 0x83) and Alt+SysRq (0x84) are keys; other bytes pass.
_TRANSLATE_HIGH = {0x83: 0x41, 0x84: 0x54}


def translate_set2(byte: int) -> int:
    """The set-1 byte the 8042 emits for set-2 ``byte`` (without the break prefix rule)."""
    if byte < 0x80:
        return _TRANSLATE_LOW[byte]
    return _TRANSLATE_HIGH.get(byte, byte)


_Byte = Annotated[int, bits(8)]
_Bit = Annotated[int, Range(0, 1)]


@dataclass
class I8042State:
    """Controller and keyboard state, all guest-visible."""

    ram: Annotated[list[_Byte], Length(RAM_BYTES)] = field(
        default_factory=lambda: [CTR_AFTER_POST] + [0] * (RAM_BYTES - 1)
    )
    """The 8042's 32 RAM bytes; byte 0 is the command byte (CTR)."""
    output_port: _Byte = OUT_AT_POWER_ON
    last_write_was_command: bool = True
    """Status bit 3: the last byte written went to 0x64."""
    pending_command: _Byte | None = None
    """A controller command waiting for its data byte on 0x60."""
    obf: bool = False
    out_byte: _Byte = 0
    """The output buffer; it keeps its last byte after being read, as the chip does."""
    out_aux: bool = False
    out_timeout: bool = False
    controller_queue: Annotated[
        list[tuple[_Byte, _Bit, _Bit]], Length(most=CONTROLLER_QUEUE_LIMIT)
    ] = field(default_factory=list)
    """Controller replies not yet in the output buffer: (byte, aux (0/1), timeout (0/1))."""
    keyboard_queue: Annotated[list[_Byte], Length(most=KEYBOARD_QUEUE_LIMIT)] = field(
        default_factory=list
    )
    """Bytes the keyboard has to send, in its own code set."""
    break_prefix_seen: bool = False
    """Translation swallowed a 0xF0; the next translated byte gets bit 7."""
    keyboard_scanning: bool = True
    keyboard_pending_command: (
        Annotated[int, OneOf((KBD_SET_LEDS, KBD_TYPEMATIC, KBD_SCAN_SET))] | None
    ) = None
    """A keyboard command waiting for its parameter byte."""
    keyboard_leds: Annotated[int, bits(3)] = 0
    keyboard_typematic: Annotated[int, bits(7)] = DEFAULT_TYPEMATIC
    keyboard_scan_set: Annotated[int, OneOf((1, 2, 3))] = 2
    irq1_level: bool = False
    irq12_level: bool = False

    def check_invariants(self) -> None:
        command = self.pending_command
        if command is not None and not (
            CMD_WRITE_RAM <= command < CMD_WRITE_RAM + RAM_BYTES or command in _COMMANDS_WITH_DATA
        ):
            raise StateError("pending_command", f"{command:#x} takes no data byte")


class I8042(Snapshotting[I8042State]):
    """The 8042 keyboard controller; ``data_port`` and ``command_port`` are its two ports."""

    DATA_BASE = 0x60
    DATA_LENGTH = 1
    COMMAND_BASE = 0x64
    COMMAND_LENGTH = 1

    def __init__(
        self,
        reset_request: Callable[[], None],
        irq1: InterruptLine | None = None,
        irq12: InterruptLine | None = None,
    ) -> None:
        self._reset_request = reset_request
        self._irq1 = irq1
        self._irq12 = irq12
        self._lock = threading.Lock()
        self._outbox = Outbox(self._lock)
        self._state = I8042State()
        self.data_port = _Port(self._read_data, self._write_data)
        self.command_port = _Port(self._read_status, self._write_command)

    # --------------------------------------------------------------- host side

    def keyboard_input(self, scancodes: Iterable[int]) -> None:
        """Keys pressed/released: set-2 scan code bytes, as the keyboard sends them.

        Dropped while the keyboard is disabled (command 0xF5) and beyond its 16-byte
        buffer, as a real keyboard drops them.
        """
        with self._lock:
            state = self._state
            if state.keyboard_scanning:
                for byte in scancodes:
                    if len(state.keyboard_queue) >= KEYBOARD_QUEUE_LIMIT:
                        break
                    state.keyboard_queue.append(byte & 0xFF)
                self._refill_locked()
        self._outbox.flush()

    @property
    def a20_enabled(self) -> bool:
        """Output-port bit 1; KVM has no A20 gate, so this is only reported."""
        with self._lock:
            return bool(self._state.output_port & OUT_A20)

    @property
    def command_byte(self) -> int:
        with self._lock:
            return self._state.ram[0]

    # ------------------------------------------------------------- guest side

    def _read_status(self) -> int:
        with self._lock:
            state = self._state
            status = STATUS_UNLOCKED
            if state.obf:
                status |= STATUS_OBF
                if state.out_aux:
                    status |= STATUS_AUX_OBF
            if state.out_timeout:
                status |= STATUS_TIMEOUT
            if state.ram[0] & CTR_SYS:
                status |= STATUS_SYS
            if state.last_write_was_command:
                status |= STATUS_CMD
            return status

    def _read_data(self) -> int:
        with self._lock:
            state = self._state
            byte = state.out_byte
            if state.obf:
                state.obf = False
                # Drop the line before the next byte raises it: one edge per byte.
                self._update_lines_locked()
                self._refill_locked()
        self._outbox.flush()
        return byte

    def _write_command(self, value: int) -> None:
        with self._lock:
            self._state.last_write_was_command = True
            if self._command_locked(value & 0xFF):
                self._outbox.post(self._reset_request)
        self._outbox.flush()

    def _write_data(self, value: int) -> None:
        with self._lock:
            state = self._state
            state.last_write_was_command = False
            command, state.pending_command = state.pending_command, None
            reset = False
            if command is None:
                # Sending to the keyboard enables its interface (QEMU's pckbd.c does
                # the same: "sending data to the keyboard reenables PS/2 communication").
                state.ram[0] &= ~CTR_KBD_DISABLE
                self._keyboard_receive_locked(value & 0xFF)
            else:
                reset = self._command_data_locked(command, value & 0xFF)
            self._refill_locked()
            if reset:
                self._outbox.post(self._reset_request)
        self._outbox.flush()

    # -------------------------------------------------------------- controller

    def _command_locked(self, command: int) -> bool:
        state = self._state
        state.pending_command = None
        reset = False
        if CMD_READ_RAM <= command < CMD_READ_RAM + RAM_BYTES:
            self._reply_locked(state.ram[command - CMD_READ_RAM])
        elif CMD_WRITE_RAM <= command < CMD_WRITE_RAM + RAM_BYTES or command in (
            _COMMANDS_WITH_DATA
        ):
            state.pending_command = command
        elif command == CMD_AUX_DISABLE:
            state.ram[0] |= CTR_AUX_DISABLE
        elif command == CMD_AUX_ENABLE:
            state.ram[0] &= ~CTR_AUX_DISABLE
        elif command in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._reply_locked(INTERFACE_OK)
        elif command == CMD_SELF_TEST:
            state.ram[0] |= CTR_SYS
            self._reply_locked(SELF_TEST_PASSED)
        elif command == CMD_KBD_DISABLE:
            state.ram[0] |= CTR_KBD_DISABLE
        elif command == CMD_KBD_ENABLE:
            state.ram[0] &= ~CTR_KBD_DISABLE
        elif command == CMD_READ_INPUT:
            self._reply_locked(INPUT_PORT)
        elif command == CMD_READ_OUTPUT:
            self._reply_locked(self._output_port_locked())
        elif command >= CMD_PULSE_FIRST:
            # Bits 0-3 clear are pulsed low for 6 us; only bit 0 (reset) is wired.
            reset = not command & OUT_RESET
        # Everything else (password, diagnostics, test inputs) is not implemented and is
        # ignored, as a controller without those features does.
        self._refill_locked()
        return reset

    def _command_data_locked(self, command: int, value: int) -> bool:
        state = self._state
        if CMD_WRITE_RAM <= command < CMD_WRITE_RAM + RAM_BYTES:
            state.ram[command - CMD_WRITE_RAM] = value
        elif command == CMD_WRITE_OUTPUT:
            state.output_port = value & ~(OUT_KBD_OBF | OUT_AUX_OBF)
            return not value & OUT_RESET
        elif command == CMD_WRITE_KBD_OBUF:
            self._reply_locked(value)
        elif command == CMD_WRITE_AUX_OBUF:
            self._reply_locked(value, aux=True)
        elif command == CMD_WRITE_AUX:
            # Sending enables the auxiliary interface, but no device answers on its
            # clock line: the controller reports a transmit time-out.
            state.ram[0] &= ~CTR_AUX_DISABLE
            self._reply_locked(NAK, aux=True, timeout=True)
        return False

    def _output_port_locked(self) -> int:
        state = self._state
        value = state.output_port
        if state.obf:
            value |= OUT_AUX_OBF if state.out_aux else OUT_KBD_OBF
        return value

    def _reply_locked(self, byte: int, aux: bool = False, timeout: bool = False) -> None:
        queue = self._state.controller_queue
        if len(queue) < CONTROLLER_QUEUE_LIMIT:
            queue.append((byte & 0xFF, int(aux), int(timeout)))

    # ---------------------------------------------------------------- keyboard

    def _keyboard_receive_locked(self, value: int) -> None:
        state = self._state
        command, state.keyboard_pending_command = state.keyboard_pending_command, None
        if command == KBD_SET_LEDS:
            state.keyboard_leds = value & 0x07
            self._keyboard_send_locked(KBD_ACK)
        elif command == KBD_TYPEMATIC:
            state.keyboard_typematic = value & 0x7F
            self._keyboard_send_locked(KBD_ACK)
        elif command == KBD_SCAN_SET:
            self._keyboard_send_locked(KBD_ACK)
            if value == 0:
                self._keyboard_send_locked(state.keyboard_scan_set)
            elif value in (1, 2, 3):
                state.keyboard_scan_set = value
        elif value in (KBD_SET_LEDS, KBD_TYPEMATIC, KBD_SCAN_SET):
            state.keyboard_pending_command = value
            self._keyboard_send_locked(KBD_ACK)
        elif value == KBD_ECHO:
            self._keyboard_send_locked(KBD_ECHO)
        elif value == KBD_IDENTIFY:
            self._keyboard_send_locked(KBD_ACK, *KBD_ID)
        elif value == KBD_ENABLE:
            state.keyboard_queue.clear()
            state.keyboard_scanning = True
            self._keyboard_send_locked(KBD_ACK)
        elif value in (KBD_DISABLE, KBD_DEFAULTS):
            state.keyboard_queue.clear()
            state.keyboard_typematic = DEFAULT_TYPEMATIC
            state.keyboard_scan_set = 2
            state.keyboard_scanning = value == KBD_DEFAULTS
            self._keyboard_send_locked(KBD_ACK)
        elif value == KBD_RESET:
            state.keyboard_queue.clear()
            state.keyboard_leds = 0
            state.keyboard_typematic = DEFAULT_TYPEMATIC
            state.keyboard_scan_set = 2
            state.keyboard_scanning = True
            self._keyboard_send_locked(KBD_ACK, KBD_BAT_OK)
        else:
            self._keyboard_send_locked(KBD_ACK)

    def _keyboard_send_locked(self, *data: int) -> None:
        queue = self._state.keyboard_queue
        for byte in data:
            if len(queue) < KEYBOARD_QUEUE_LIMIT:
                queue.append(byte)

    # ---------------------------------------------------------- output buffer

    def _refill_locked(self) -> None:
        state = self._state
        while not state.obf:
            if state.controller_queue:
                byte, aux, timeout = state.controller_queue.pop(0)
                self._load_locked(byte, bool(aux), bool(timeout))
            elif state.keyboard_queue and not state.ram[0] & CTR_KBD_DISABLE:
                byte = state.keyboard_queue.pop(0)
                if state.ram[0] & CTR_TRANSLATE:
                    if byte == BREAK_PREFIX:
                        state.break_prefix_seen = True
                        continue
                    byte = translate_set2(byte)
                    if state.break_prefix_seen:
                        byte |= 0x80
                        state.break_prefix_seen = False
                self._load_locked(byte, aux=False, timeout=False)
            else:
                break
        self._update_lines_locked()

    def _load_locked(self, byte: int, aux: bool, timeout: bool) -> None:
        state = self._state
        state.obf = True
        state.out_byte = byte
        state.out_aux = aux
        state.out_timeout = timeout

    def _update_lines_locked(self) -> None:
        state = self._state
        ctr = state.ram[0]
        irq1 = state.obf and not state.out_aux and bool(ctr & CTR_KBD_INT)
        irq12 = state.obf and state.out_aux and bool(ctr & CTR_AUX_INT)
        if irq1 != state.irq1_level:
            state.irq1_level = irq1
            if self._irq1 is not None:
                self._outbox.post(functools.partial(self._irq1.set_level, irq1))
        if irq12 != state.irq12_level:
            state.irq12_level = irq12
            if self._irq12 is not None:
                self._outbox.post(functools.partial(self._irq12.set_level, irq12))

    # ---------------------------------------------------------------- snapshot

    def save_state(self) -> I8042State:
        with self._lock:
            return detached(self._state)

    def check_state(self, data: object) -> I8042State:
        return state_from_data(I8042State, data, "i8042")

    def restore_state(self, state: I8042State) -> None:
        with self._lock:
            self._state = detached(state)
            # Drive the lines to the snapshot's levels; a controller already there
            # ignores it.
            for line, level in ((self._irq1, state.irq1_level), (self._irq12, state.irq12_level)):
                if line is not None:
                    self._outbox.post(functools.partial(line.set_level, level))
        self._outbox.flush()


class _Port:
    """One decoded byte at offset 0; wider accesses see all-ones above it."""

    def __init__(self, read_byte: Callable[[], int], write_byte: Callable[[int], None]) -> None:
        self._read_byte = read_byte
        self._write_byte = write_byte

    def read(self, offset: int, size: int) -> int:
        ones = (1 << (8 * max(size, 0))) - 1
        if offset != 0 or size < 1:
            return ones
        return self._read_byte() | (ones & ~0xFF)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size >= 1:
            self._write_byte(value & 0xFF)
