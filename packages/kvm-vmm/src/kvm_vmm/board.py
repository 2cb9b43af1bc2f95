"""The board's fixed facts, each defined once: what the bus decodes and the ACPI tables say.

:mod:`kvm_vmm.platform_table` builds the device registry from these, the machine maps
that registry into kvmfast's address map, and :mod:`kvm_vmm.acpi` describes the same
registry to the guest. Nothing else spells these numbers.

The legacy ISA devices keep the ports and IRQs every PC has (the device models carry
those as class constants: ``Uart16550.COM1``, ``Pit.BASE``...); what is ours to choose
is here.
"""

from __future__ import annotations

from kvm_vmm.layout import PCI_HOLE_START, Region

# Local APICs: in the kernel (split irqchip), at the architectural default base
# (Intel SDM vol. 3A §11.4.1, IA32_APIC_BASE reset value).
LAPIC_ADDRESS = 0xFEE0_0000
IOAPIC_ADDRESS = 0xFEC0_0000
IOAPIC_GSI_BASE = 0
IOAPIC_PINS = 24
# 8-bit xAPIC IDs, 0xFF is the broadcast ID, and the MADT gives the IOAPIC the ID
# after the last vCPU's: APIC IDs 0..253 for vCPUs.
MAX_CPUS = 254

# ISA interrupt lines, 0-15. IRQ0 reaches IOAPIC pin 2 (the MADT says so with an
# interrupt source override); every other ISA IRQ n is pin n.
ISA_IRQS = 16
PIT_IRQ = 0
PIT_GSI = 2
KEYBOARD_IRQ = 1
CASCADE_IRQ = 2  # the slave PIC's INTR on master input 2: no device may take it
RTC_IRQ = 8
SCI_IRQ = 9
MOUSE_IRQ = 12
# Lines a PC reserves though no device of ours drives them: the FPU error (13) and the
# two IDE channels (14, 15), which guests probe for.
RESERVED_ISA_IRQS = (13, 14, 15)
# IOAPIC pins above the ISA range, for PCI INTx (one per pin: 16-23).
PCI_INTX_GSIS = range(ISA_IRQS, IOAPIC_PINS)

# ACPI fixed hardware (ACPI 6.5 §4.8.3): the PM1a event, PM1a control and PM timer
# blocks, one after the other from PM_BASE, as PIIX4/ICH place them at 0x600.
PM_BASE = 0x600
PM1A_EVT_BLK = PM_BASE
PM1A_CNT_BLK = PM_BASE + 4
PM_TMR_BLK = PM_BASE + 8
# SLP_TYPx of soft-off, announced by the DSDT's \_S5 and acted on by the machine.
SLP_TYP_S5 = 5
# The PIIX/ICH reset control register; the FADT's RESET_REG names it.
RESET_PORT = 0xCF9

# Reserved for the PCI bus: the 32-bit window its memory BARs are allocated from, the
# enhanced configuration (ECAM) window (PCI Firmware Spec 3.2 §4.1.2: 1 MiB per bus,
# buses 0-255), and the port range for I/O BARs (above every legacy port).
PCI_SEGMENT = 0
PCI_BUSES = 256
PCI_MMIO_WINDOW = Region("PCI memory BARs", PCI_HOLE_START, 0x2000_0000)
PCI_ECAM_WINDOW = Region("PCI ECAM", PCI_MMIO_WINDOW.end, PCI_BUSES << 20)
PCI_IO_WINDOW = Region("PCI I/O BARs", 0xC000, 0x4000)
# Configuration mechanism #1 (PCI Local Bus Spec 3.0 §3.2.2.3.2): CONFIG_ADDRESS at
# 0xCF8, CONFIG_DATA at 0xCFC; the 8 ports 0xCF8-0xCFF are the host bridge's (the reset
# register 0xCF9 among them, as on PIIX).
PCI_CONFIG_PORTS = Region("PCI configuration mechanism #1", 0xCF8, 8)
# Device and function numbers on a bus (§3.2.2.3.2: 5 and 3 bits); device 0 is the
# host bridge, so the _PRT routes devices 1-31. Interrupt pins INTA#-INTD# are 0-3
# here (config space's Interrupt Pin register says 1-4).
PCI_SLOTS = 32
PCI_FUNCTIONS = 8
PCI_INTX_PINS = 4


def ioapic_id(cpus: int) -> int:
    """The IOAPIC's ID in the MADT: the first APIC ID after the vCPUs'."""
    return cpus


def pci_intx_gsi(slot: int, pin: int) -> int:
    """The IOAPIC pin (GSI) that INTx ``pin`` (0..3 = INTA#..INTD#) of device ``slot`` on
    bus 0 reaches: the one definition the DSDT's _PRT and the VMM's wiring share.

    Rotated by slot as the PCI-to-PCI bridge swizzle does (PCI-to-PCI Bridge Spec 1.2
    §9.1), so that the INTA# of neighbouring devices, which most devices use alone, lands
    on different pins.
    """
    if not 0 <= slot < PCI_SLOTS:
        raise ValueError(f"PCI device number {slot} is outside 0..{PCI_SLOTS - 1}")
    if not 0 <= pin < PCI_INTX_PINS:
        raise ValueError(f"PCI interrupt pin {pin} is outside 0..{PCI_INTX_PINS - 1} (INTA-INTD)")
    return PCI_INTX_GSIS[(slot + pin) % len(PCI_INTX_GSIS)]
