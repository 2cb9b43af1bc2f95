"""kvmfast.assembler's wrapper of GNU as, kvmfast.flat_guest's mode set-ups and
kvmfast.testing's require_kvm skip-or-fail rule."""

from __future__ import annotations

import pytest
from kvmfast_guest_support import RAM_SIZE, RecordingDevice

from kvmfast import ExitSink, Kvm, NullSink
from kvmfast import testing as kvm_testing
from kvmfast.assembler import AssemblerMissing, AssemblyError, assemble, assemble_program
from kvmfast.flat_guest import install_idt, setup_protected_mode


def test_assemble_defaults_to_intel_64_bit_at_0x1000() -> None:
    assert assemble("mov rax, 1\nhlt") == bytes.fromhex("48c7c001000000f4")
    program = assemble_program(".global here\nnop\nhere:\njmp here", origin=0x7C00)
    assert program.symbols["here"] == 0x7C01
    assert program.code == bytes.fromhex("90ebfe")


def test_the_source_may_choose_syntax_and_mode() -> None:
    att = assemble(".att_syntax prefix\nmovl $1, %eax", bits=32)
    assert att == assemble("mov eax, 1", bits=32) == bytes.fromhex("b801000000")
    assert assemble("mov ax, 1", bits=16) == bytes.fromhex("b80100")
    with pytest.raises(ValueError):
        assemble("nop", bits=8)


def test_assembly_is_cached_per_source() -> None:
    first = assemble_program("nop\nnop\nint3")
    assert assemble_program("nop\nnop\nint3") is first
    assert assemble_program("nop\nnop\nint3", origin=0x2000) is not first


def test_assembler_errors_carry_the_message() -> None:
    with pytest.raises(AssemblyError, match="no such instruction"):
        assemble("frobnicate rax")


def test_missing_binutils_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AssemblerMissing, match="binutils"):
        assemble("nop # not cached yet: missing binutils")


def test_require_kvm_skips_or_fails_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm_testing, "kvm_unavailable_reason", lambda: "no /dev/kvm (test)")
    monkeypatch.delenv(kvm_testing.REQUIRE_KVM_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no /dev/kvm \(test\)"):
        kvm_testing.require_kvm()
    monkeypatch.setenv(kvm_testing.REQUIRE_KVM_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="KVM_SPLIT_REQUIRE_KVM=1"):
        kvm_testing.require_kvm()


@pytest.mark.kvm
def test_protected_mode_guest_takes_an_interrupt_without_an_irqchip(kvm: Kvm) -> None:
    vm = kvm.create_vm(irqchip="none")
    memory = vm.add_memory(0, RAM_SIZE)
    # This host's KVM cannot emulate IRET in protected mode (../shared/HOST-KVM.md):
    # the handler ends the run itself, and exits give the injector its chances.
    program = assemble_program(
        """
    .global entry, handler
    entry:
        mov eax, cr0
        mov dx, 0x80
        out dx, eax
        sti
    spin:
        out 0x82, al
        jmp spin
    handler:
        mov al, 0x30
        out 0xf4, al
        """,
        bits=32,
    )
    vm.write(0x1000, program.code)
    vm.add_pio(0xF4, 1, ExitSink())
    device = RecordingDevice()
    vm.add_pio(0x80, 1, device)
    vm.add_pio(0x82, 1, NullSink())
    vcpu = vm.create_vcpu(0)
    setup_protected_mode(vm, vcpu, memory, entry=program.symbols["entry"], stack=0x8000)
    install_idt(vm, vcpu, base=0x10000, handlers={0x30: program.symbols["handler"]})
    assert vcpu.get_sregs()["idt"] == {"base": 0x10000, "limit": 256 * 8 - 1}

    class OneShotPic:
        def acknowledge(self) -> int:
            vcpu.kicker().set_extint(False)
            return 0x30

    vcpu.set_extint_controller(OneShotPic())
    vcpu.kicker().set_extint(True)
    exit = vcpu.run()
    assert (exit.reason, exit.value) == ("device_exit", 0x30)
    assert device.log == [("write", 0, 4, 0x11)]  # CR0 = ET | PE
