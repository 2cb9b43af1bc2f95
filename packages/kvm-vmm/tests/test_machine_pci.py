"""A guest on a Machine finds the PCI host bridge where the platform table puts it.

It reads the host bridge's IDs through configuration mechanism #1 (PCI Local Bus Spec
3.0 §3.2.2.3.2: CONFIG_ADDRESS 0xCF8, CONFIG_DATA 0xCFC, byte and word offsets) and
through ECAM (PCI Express Base Spec 3.0 §7.2.2), an empty slot reads all ones, and the
reset register at 0xCF9, among the configuration ports, still resets the machine.
"""

from __future__ import annotations

import struct

from kvm_devices.testing import MemorySink
from kvm_vmm import board, layout
from kvm_vmm.loaders.image import EntryState
from kvm_vmm.machine import Machine, MachineConfig
from kvmfast.testing import assemble_program, require_kvm

LOAD_ADDRESS = 0x100000

# Each `emit` writes eax's four bytes to COM1, lowest first.
GUEST = f"""
.global entry
entry:
    lea rsp, [rip + stack_top]
    mov dx, 0xCF8
    mov eax, 0x80000000            /* enable, bus 0, device 0, function 0, register 0 */
    out dx, eax
    mov dx, 0xCFC
    in eax, dx
    call emit
    mov dx, 0xCFE                  /* the device ID's word, at CONFIG_DATA + 2 */
    xor eax, eax
    in ax, dx
    call emit
    mov dx, 0xCF8
    mov eax, 0x80000008            /* revision and class code */
    out dx, eax
    mov dx, 0xCFF
    xor eax, eax
    in al, dx                      /* the base class, at CONFIG_DATA + 3 */
    call emit
    mov ebx, {board.PCI_ECAM_WINDOW.start:#x}
    mov eax, dword ptr [rbx]       /* ECAM: bus 0, device 0, function 0, register 0 */
    call emit
    mov eax, dword ptr [rbx + (7 << 15)]   /* ECAM: device 7, an empty slot */
    call emit
    mov dx, 0xCF8
    mov eax, 0x80002800            /* device 5, an empty slot */
    out dx, eax
    mov dx, 0xCFC
    in eax, dx
    call emit
    mov dx, 0xCF8
    in eax, dx                     /* CONFIG_ADDRESS reads back */
    call emit
    mov dx, {board.RESET_PORT:#x}
    mov al, 0x06                   /* the FADT's RESET_VALUE */
    out dx, al
    hlt
emit:
    mov dx, 0x3F8
    mov ecx, 4
1:  out dx, al
    shr eax, 8
    loop 1b
    ret
    .balign 16
    .fill 1024, 1, 0
stack_top:
"""


def test_a_guest_reads_the_host_bridge_through_0xcf8_and_ecam_and_resets_at_0xcf9() -> None:
    require_kvm()
    console = MemorySink()
    with Machine(MachineConfig(memory_size=16 * layout.MIB, console=console)) as machine:
        program = assemble_program(GUEST, origin=LOAD_ADDRESS)
        machine.write_memory(LOAD_ADDRESS, program.code)
        machine.enter(EntryState("long64", program.symbols["entry"]))
        outcome = machine.run(60)
        assert outcome.reason == "guest requested a reset", outcome
        assert struct.unpack("<7I", bytes(console.data)) == (
            0x29C0_8086,  # q35's host bridge: vendor Intel, device 0x29C0
            0x29C0,
            0x06,  # base class 06h, bridge
            0x29C0_8086,
            0xFFFF_FFFF,
            0xFFFF_FFFF,
            0x8000_2800,
        )
        counters = machine.platform.pci_bus.counters()
        assert (counters.reads, counters.absent_device) == (4, 2)
