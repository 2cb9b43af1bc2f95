"""What snapshot_guest.S must print, computed on the host from the same steps.

The guest's checksums are vector-register computations it never stores; this model
repeats them lane by lane (the instructions' definitions: Intel SDM Vol. 2 PADDD, PXOR,
PSLLD/PSRLD, POR, PSHUFD, VPERMQ, VPBROADCASTD), so the test knows the right summary
line without trusting any run of the guest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GUEST_SOURCE = Path(__file__).parent / "snapshot_guest.S"
MASK32 = 0xFFFF_FFFF


def _guest_source() -> str:
    return GUEST_SOURCE.read_text()


def _constant(name: str) -> int:
    """A ``.set NAME, value`` of the guest's source: its tick counts live there only."""
    match = re.search(rf"^\s*\.set {name}, (\w+)", _guest_source(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{GUEST_SOURCE.name} sets no {name}")
    return int(match.group(1), 0)


def _seed(label: str) -> tuple[int, ...]:
    """The eight dwords after ``label: .long`` in the guest's .rodata."""
    match = re.search(rf"^{label}: \.long (.+)$", _guest_source(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{GUEST_SOURCE.name} has no {label}")
    return tuple(int(word, 0) for word in match.group(1).split(","))


FIRST_PIT_TICKS = _constant("FIRST_PIT_TICKS")
SECOND_PIT_TICKS = _constant("SECOND_PIT_TICKS")
LAPIC_TICKS = _constant("LAPIC_TICKS")
# SSE2 mode uses the first four dwords of each.
SEEDS = {label: _seed(label) for label in ("seed_a", "seed_d", "seed_s", "seed_l", "seed_m")}

CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_OSXSAVE = 1 << 18
XCR0_X87_SSE_AVX = 7


def _rotl32(value: int, count: int) -> int:
    return ((value << count) | (value >> (32 - count))) & MASK32


def _pshufd(dwords: Sequence[int], imm: int) -> list[int]:
    """PSHUFD / VPSHUFD: within each 128-bit lane, dword i = dword (imm >> 2i) & 3."""
    out: list[int] = []
    for lane in range(0, len(dwords), 4):
        out += [dwords[lane + (imm >> (2 * i) & 3)] for i in range(4)]
    return out


def _vpermq(dwords: Sequence[int], imm: int) -> list[int]:
    """VPERMQ: qword i = qword (imm >> 2i) & 3 of the whole YMM."""
    out: list[int] = []
    for i in range(4):
        source = imm >> (2 * i) & 3
        out += dwords[2 * source : 2 * source + 2]
    return out


@dataclass
class Checksums:
    """The guest's vector registers as dword lists: A (XMM/YMM0), D (1), S (3) of the
    PIT checksum, L (6) and M (7) of the LAPIC one."""

    avx2: bool
    a: list[int]
    d: list[int]
    s: list[int]
    lapic: list[int]
    m: list[int]

    @classmethod
    def seeded(cls, avx2: bool) -> Checksums:
        width = 8 if avx2 else 4
        return cls(avx2, *(list(seed[:width]) for seed in SEEDS.values()))

    def mix(self, value: int) -> None:
        """snapshot_guest.S's ``mix``."""
        self.d = [(d + s) & MASK32 for d, s in zip(self.d, self.s, strict=True)]
        a = [_rotl32(a ^ d, 7) for a, d in zip(self.a, self.d, strict=True)]
        a = _vpermq(a, 0x39) if self.avx2 else _pshufd(a, 0x39)
        self.a = [(x + value) & MASK32 for x in a]

    def lapic_mix(self, value: int) -> None:
        """snapshot_guest.S's ``lapic_mix``."""
        mixed = [((x ^ m) + value) & MASK32 for x, m in zip(self.lapic, self.m, strict=True)]
        self.lapic = _pshufd(mixed, 0x93)


def _qwords(dwords: Sequence[int]) -> str:
    pairs = [dwords[i] | dwords[i + 1] << 32 for i in range(0, len(dwords), 2)]
    return "".join(f"{pair:016x}:" for pair in pairs)


def summary_line(avx2: bool, serial: bytes, keys: Sequence[int]) -> str:
    """The guest's last line for a run in ``avx2`` mode given ``serial`` (the line, its
    carriage return included) and ``keys`` (the set-1 bytes it read)."""
    sums = Checksums.seeded(avx2)
    for tick in range(1, FIRST_PIT_TICKS + 1):
        sums.mix(tick)
    for byte in [*serial, *keys]:
        sums.mix(byte)
    for tick in range(FIRST_PIT_TICKS + 1, FIRST_PIT_TICKS + SECOND_PIT_TICKS + 1):
        sums.mix(tick)
    for tick in range(1, LAPIC_TICKS + 1):
        sums.lapic_mix(tick)
    cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_OSXSAVE if avx2 else 0)
    xcr0 = XCR0_X87_SSE_AVX if avx2 else 0
    return (
        f"summary: mode {'avx2' if avx2 else 'sse2'}"
        f" pit {FIRST_PIT_TICKS + SECOND_PIT_TICKS:#x} lapic {LAPIC_TICKS:#x}"
        " empty-key-interrupts 0x0"
        f" cr4 {cr4:#x} xcr0 {xcr0:#x} sum {_qwords(sums.a)} lapic-sum {_qwords(sums.lapic)}"
    )
