"""A VMM of its own, from the parts: kvmfast's VM, vCPU and run loop, kvm-devices' UART,
kvm_vmm's memory layout, CPUID and long-mode entry, and a device of our own that the
guest talks to. No Machine: each part is called directly.

The guest, assembled at run time, writes each byte of its message to our device, reads
it back in capitals, and prints that on COM1; its write to port 0xF4, where kvmfast's
ExitSink sits, ends the run. Run: ``python examples/custom_vmm.py`` (needs /dev/kvm
and binutils).
"""

from __future__ import annotations

import sys

import kvmfast
from kvm_devices.uart import Uart16550
from kvm_vmm import board, cpu_setup, layout
from kvm_vmm.cpuid import cpuid_for_vcpu
from kvm_vmm.loaders.image import EntryState
from kvmfast.assembler import assemble

LOAD_ADDRESS = 0x100000
CAPITALS_PORT = 0x3E0
EXIT_PORT = 0xF4
GUEST = f"""
.global entry
entry:
    lea rsi, [rip + message]
next:
    lodsb
    test al, al
    jz done
    mov dx, {CAPITALS_PORT}
    out dx, al
    in al, dx
    mov dx, {Uart16550.COM1}
    out dx, al
    jmp next
done:
    out {EXIT_PORT}, al
message: .asciz "hello from the guest of a custom vmm\\n"
"""


class Capitals:
    """Our own device: the byte last written, read back in capitals."""

    def __init__(self) -> None:
        self.latched = 0

    def read(self, offset: int, size: int) -> int:
        return self.latched - 0x20 if ord("a") <= self.latched <= ord("z") else self.latched

    def write(self, offset: int, size: int, value: int) -> None:
        self.latched = value & 0xFF


class NoIrq:
    """The UART's interrupt line, wired to nothing: this guest polls."""

    def set_level(self, level: bool) -> None:
        pass

    def pulse(self) -> None:
        pass


class Stdout:
    def write_bytes(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def main() -> int:
    kvm = kvmfast.Kvm()
    vm = kvm.create_vm("split", board.IOAPIC_PINS)
    for region in layout.ram_regions(16 * layout.MIB):
        vm.add_memory(region.start, region.size)
    vm.add_pio(Uart16550.COM1, Uart16550.SIZE, Uart16550(NoIrq(), Stdout()))
    vm.add_pio(CAPITALS_PORT, 1, Capitals())
    vm.add_pio(EXIT_PORT, 1, kvmfast.ExitSink())
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(cpuid_for_vcpu(kvm.supported_cpuid(), 0, 1))
    vm.write(LOAD_ADDRESS, assemble(GUEST, origin=LOAD_ADDRESS))
    cpu_setup.enter(vcpu, vm, EntryState("long64", LOAD_ADDRESS))  # GDT, page tables
    result = vcpu.run()
    print(f"the guest left through {result.reason}")
    vm.close()
    return 0 if result.reason == "device_exit" else 1


if __name__ == "__main__":
    sys.exit(main())
