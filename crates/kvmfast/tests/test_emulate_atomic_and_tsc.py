"""LOCK CMPXCHG16B (SDM Vol. 2A "CMPXCHG8B/CMPXCHG16B": both outcomes against the host,
#GP for a misaligned operand, atomic against another vCPU), RDTSCP and RDPID (Vol. 2B:
the guest's TSC and IA32_TSC_AUX)."""

from __future__ import annotations

import struct

import pytest
from emulation_support import (
    BUF_SIZE,
    CODE_AT,
    STACK_TOP,
    CpuState,
    HostEmulation,
    assert_same_results,
    completions,
    emulated_cpl0,
    exception_handlers_asm,
    install_exception_handlers,
    make_guest,
    run_in_guest,
    run_natively,
    run_until_exit,
)
from kvmfast_guest_support import VcpuThread

from kvmfast import Kvm
from kvmfast.testing import setup_long_mode

pytestmark = pytest.mark.kvm

MSR_IA32_TSC_AUX = 0xC0000103
OLD = (0x1111_2222_3333_4444, 0x5555_6666_7777_8888)


@emulated_cpl0
@pytest.mark.parametrize("equal", [True, False])
def test_cmpxchg16b_matches_the_host(kvm: Kvm, equal: bool) -> None:
    body = "lea rsi, [rip + buf + 16]\nlock cmpxchg16b [rsi]"
    expected = OLD if equal else (OLD[0], OLD[1] ^ 1)
    state = CpuState(
        rflags=0x2 | (0 if equal else 0x40),
        buf=(bytes(16) + struct.pack("<QQ", *OLD)).ljust(BUF_SIZE, b"\0"),
    ).with_gprs(rax=expected[0], rdx=expected[1], rbx=0xAAAA, rcx=0xBBBB)
    guest, vm_guest = run_in_guest(kvm, body, state)
    assert_same_results(guest, run_natively(body, state), ignore=frozenset({"rsi"}))
    assert completions(vm_guest) == {"cmpxchg16b": 1}


def test_cmpxchg16b_misaligned_is_gp(kvm: Kvm) -> None:
    guest = make_guest(
        kvm,
        f".global entry, at\nentry:\n lea rsi, [rip + buf + 8]\nat:\n lock cmpxchg16b [rsi]\n"
        f"{exception_handlers_asm()}",
    )
    install_exception_handlers(guest)
    assert run_until_exit(guest) == 13
    assert guest.vcpu.get_regs()["rdx"] == guest.symbols["at"]


@emulated_cpl0
def test_two_vcpus_racing_cmpxchg16b_lose_no_update(kvm: Kvm) -> None:
    rounds = 1500
    source = f"""
.global entry
entry:
    lea rsi, [rip + buf]
    mov r9d, {rounds}
1:  mov rax, [rsi]
    mov rdx, [rsi + 8]
2:  lea rbx, [rax + 1]
    lea rcx, [rdx + 3]
    lock cmpxchg16b [rsi]
    jnz 2b
    dec r9d
    jnz 1b
    out 0xf4, al
"""
    guest = make_guest(kvm, source)
    second = guest.vm.create_vcpu(1)
    second.set_cpuid(kvm.supported_cpuid())
    setup_long_mode(guest.vm, second, guest.memory, entry=CODE_AT, stack=STACK_TOP - 0x1000)
    second.set_mp_state(0)  # RUNNABLE: no INIT/SIPI in this test
    threads = [VcpuThread(guest.vcpu), VcpuThread(second)]
    for thread in threads:
        assert thread.join(120).reason == "device_exit"
    low, high = struct.unpack("<QQ", guest.vm.read(guest.symbols["buf"], 16))
    assert (low, high) == (2 * rounds, 6 * rounds)
    done = guest.vm.counters()["completions"]["cmpxchg16b"]
    assert done >= 2 * rounds  # each failed attempt is a completion too


@emulated_cpl0
def test_rdtscp_reads_the_guest_tsc_and_tsc_aux(kvm: Kvm) -> None:
    guest = make_guest(
        kvm,
        """
.global entry
entry:
    rdtscp
    mov r8, rax
    mov r9, rdx
    mov r10, rcx
    rdtscp
    out 0xf4, al
""",
    )
    guest.vcpu.set_msrs({MSR_IA32_TSC_AUX: 0x1234_5678})
    run_until_exit(guest)
    regs = guest.vcpu.get_regs()
    first = (regs["r9"] << 32) | regs["r8"]
    second = (regs["rdx"] << 32) | regs["rax"]
    assert 0 < first < second
    assert regs["r10"] == regs["rcx"] == 0x1234_5678
    assert completions(guest) == {"rdtscp": 2}


def test_rdpid_reads_tsc_aux(kvm: Kvm, host_emulation: HostEmulation) -> None:
    """With RDPID in the guest's CPUID (leaf 7, ECX bit 22); this host's KVM emulator
    runs RDPID itself, other hosts' may leave it to the fallback, and under VMX/SVM the
    processor runs it."""
    guest = make_guest(
        kvm, f".global entry\nentry:\n rdpid r11\n out 0xf4, al\n{exception_handlers_asm()}"
    )
    install_exception_handlers(guest)
    cpuid = [
        (f, i, fl, a, b, c | (1 << 22) if (f, i) == (7, 0) else c, d)
        for f, i, fl, a, b, c, d in kvm.supported_cpuid()
    ]
    guest.vcpu.set_cpuid(cpuid)
    guest.vcpu.set_msrs({MSR_IA32_TSC_AUX: 0x55AA})
    if run_until_exit(guest) == 6 and not completions(guest):
        if host_emulation.emulates_cpl0:
            pytest.skip("the host raises #UD for RDPID in its own emulator, before any exit")
        pytest.skip("the host processor raises #UD for RDPID (it has no RDPID)")
    assert guest.vcpu.get_regs()["r11"] == 0x55AA
    assert completions(guest) in ({}, {"rdpid": 1})
