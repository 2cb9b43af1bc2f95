"""Allocators for what devices added after the board need: interrupt lines and BAR space.

Each refuses a conflict or exhaustion with an error naming the owner already there,
so that a device that cannot be placed fails when it is added, not in the guest.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ResourceError(ValueError):
    """A line or window that cannot be given as asked."""


class ResourceConflict(ResourceError):
    """The line or range is already someone else's."""


class ResourceExhausted(ResourceError):
    """No free line or range is left of the kind asked for."""


@dataclass
class IrqAllocator:
    """IOAPIC pins (GSIs) 0..``pins``-1, of which 0..``isa_irqs``-1 are the ISA IRQs.

    ISA IRQ n is GSI n (IRQ0's override to GSI 2 is the board's wiring, claimed by the
    board as IRQ 0). A device added later takes a free ISA line (:meth:`allocate_isa`:
    a legacy device, edge-triggered on the PIC too) or a free pin above the ISA range
    (:meth:`allocate_gsi`: PCI INTx, level-triggered, IOAPIC only).
    """

    pins: int
    isa_irqs: int
    owners: dict[int, str] = field(default_factory=dict)

    def claim(self, line: int, owner: str) -> int:
        """Take ``line`` for ``owner``; a line already taken is a conflict."""
        if not 0 <= line < self.pins:
            raise ResourceError(f"{owner}: IRQ {line} is outside the IOAPIC's 0..{self.pins - 1}")
        holder = self.owners.get(line)
        if holder is not None:
            raise ResourceConflict(f"{owner}: IRQ {line} is already {holder}'s")
        self.owners[line] = owner
        return line

    def allocate_isa(self, owner: str) -> int:
        """The lowest free ISA IRQ."""
        return self.claim(self.free_isa(owner), owner)

    def free_isa(self, owner: str) -> int:
        """The ISA IRQ allocate_isa() would give, left free (for a caller that claims
        it together with the rest of a device)."""
        return self._first_free(range(self.isa_irqs), owner, "ISA IRQ")

    def allocate_gsi(self, owner: str) -> int:
        """The lowest free IOAPIC pin above the ISA IRQs."""
        lines = range(self.isa_irqs, self.pins)
        return self.claim(self._first_free(lines, owner, "IOAPIC pin above ISA"), owner)

    def _first_free(self, lines: range, owner: str, kind: str) -> int:
        for line in lines:
            if line not in self.owners:
                return line
        raise ResourceExhausted(
            f"{owner}: no free {kind} left (all of {lines.start}..{lines.stop - 1} taken)"
        )


@dataclass
class WindowAllocator:
    """Naturally aligned blocks out of ``[base, base + length)``, as PCI BARs need.

    A BAR of size s (a power of two) decodes an s-aligned address (PCI Local Bus
    Specification 3.0 §6.2.5.1), so each block is aligned to its size, or to a larger
    ``alignment`` if asked. Blocks are handed out upwards and never freed: devices are
    added while the machine is built, not removed.
    """

    name: str
    base: int
    length: int
    owners: list[tuple[int, int, str]] = field(default_factory=list)
    _next: int | None = None

    def allocate(self, size: int, owner: str, alignment: int = 1) -> int:
        """The base of a fresh block of ``size`` bytes for ``owner``."""
        if size <= 0 or size & (size - 1):
            raise ResourceError(f"{owner}: a BAR size is a power of two, not {size:#x}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ResourceError(f"{owner}: alignment {alignment:#x} is not a power of two")
        step = max(size, alignment)
        start = self.base if self._next is None else self._next
        address = (start + step - 1) // step * step
        if address + size > self.base + self.length:
            used = start - self.base
            raise ResourceExhausted(
                f"{owner}: {size:#x} bytes do not fit in the {self.name} window"
                f" [{self.base:#x}, {self.base + self.length:#x}) ({used:#x} bytes used)"
            )
        self._next = address + size
        self.owners.append((address, size, owner))
        return address
