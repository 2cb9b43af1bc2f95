"""The host check's probe guest: a few instructions per question, each run in a fresh VM.

One assembly program holds every probe (built once with GNU as, then cached
with the report); :class:`ProbeGuest` runs one entry of it in a one-vCPU
split-irqchip VM through kvmfast, exactly as the VMM's own guests run, and
says how it ended (:class:`ProbeRun`). The guest talks through three ports:
REPORT_PORT (values, recorded in order with KVM_EXIT_IOAPIC_EOI exits),
SIGNAL_PORT (the host raises the probe's interrupt) and DONE_PORT (kvmfast's
ExitSink: the value ends the run). A watchdog stops a probe that hangs.

Memory (2 MiB): GDT, TSS, IDT and page tables in the first pages, the program
at 0x10000. Long-mode probes run with 4 GiB identity-mapped; only the program's
"user page" is user-accessible, so a CPL-3 fetch anywhere else faults, as in Linux.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import kvmfast
from kvm_vmm.board import LAPIC_ADDRESS
from kvm_vmm.cpuid import CpuidEntry
from kvmfast import x86
from kvmfast.assembler import GuestProgram, assemble_program
from kvmfast.x86 import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_OSXSAVE,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_SCE,
)

if TYPE_CHECKING:
    from kvmfast._native import Regs, Segment, Sregs

Register = Literal["eax", "ebx", "ecx", "edx"]
ProbeMode = Literal["kernel", "user", "protected32"]

REPORT_PORT = 0x98  # 4 bytes: the guest reports a value
SIGNAL_PORT = 0x9C  # the guest asks the host to act (raise an interrupt)
DONE_PORT = 0xF4  # kvmfast ExitSink: run() returns with the value written
PASSED = 1
WRONG_RESULT = 2
RETURNED_FROM_SYSCALL = 3
EXCEPTION_BASE = 0x100  # + vector
LEVEL_VECTOR = 0x5A
EDGE_VECTOR = 0x5B
LEVEL_GSI = 5
LOOP_COUNT = 5000  # two instructions per iteration
DEFERRED_LOOP = 1000  # iterations after STI in the deferred-injection probe
NOT_TAKEN = 0xFFFF_FFFF  # the deferred-injection probe's "handler has not run"
# KVM's paravirtual leaf, and a hypercall number KVM does not know: a hypercall that
# completes returns -KVM_ENOSYS in RAX (Documentation/virt/kvm/x86/hypercalls.rst).
KVM_CPUID_FEATURES = 0x4000_0001
UNKNOWN_HYPERCALL = 0xDEAD
KVM_ENOSYS_RESULT = (-1000) & 0xFFFF_FFFF

PROBE_RAM = 2 << 20
GDT_ADDRESS = 0x1000
TSS_ADDRESS = 0x2000
IDT_ADDRESS = 0x3000
PAGE_TABLES = 0x4000  # PML4, PDPT, 4 PDs, then one PT for the first 2 MiB
GDT32_ADDRESS = 0xB000
PROGRAM_ORIGIN = 0x10000
KERNEL_STACK = 0x80000

# The flat guests' GDT of kvmfast.x86, then user code and data (RPL 3) and the TSS.
KERNEL_CS, KERNEL_DS = x86.FLAT_GUEST_CS, x86.FLAT_GUEST_DS
USER_CS, USER_DS, TSS_SELECTOR = 0x1B, 0x23, 0x28
MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC000_0081, 0xC000_0082, 0xC000_0084
RFLAGS_IOPL3 = 0x3002  # reserved bit 1 and IOPL 3: user mode may use the probe ports
LAPIC_SVR, LAPIC_SVR_ENABLED = 0xF0, 0x1FF
MSI_ADDRESS = LAPIC_ADDRESS  # an MSI to APIC ID 0, physical, fixed (SDM 11.11.1)
MSI_LEVEL, MSI_ASSERT = 1 << 15, 1 << 14

_EXCEPTION_STUBS = "\n".join(
    f"        .global exception_{vector}\nexception_{vector}:\n"
    f"        mov eax, EXCEPTION_BASE + {vector}\n        out DONE_PORT, eax\n"
    for vector in range(32)
)

PROBE_SOURCE = f"""
        .set REPORT_PORT, {REPORT_PORT}
        .set SIGNAL_PORT, {SIGNAL_PORT}
        .set DONE_PORT, {DONE_PORT}
        .set EXCEPTION_BASE, {EXCEPTION_BASE}
        .set LAPIC_ISR, 0x100
        .set LAPIC_TMR, 0x180
        .set LAPIC_EOI, 0xB0
        .set LEVEL_VECTOR, {LEVEL_VECTOR}

        .macro PASS
        mov eax, {PASSED}
        out DONE_PORT, eax
        .endm

        .macro REPORT value
        mov eax, \\value
        out REPORT_PORT, eax
        .endm

        .global count_loop
count_loop:                     /* rcx iterations: kernel-mode execution speed */
1:      dec rcx
        jnz 1b
        PASS

        .global cpuid_leaves
cpuid_leaves:
        mov eax, 1
        xor ecx, ecx
        cpuid
        REPORT ecx
        REPORT edx
        mov eax, 7
        xor ecx, ecx
        cpuid
        REPORT ebx
        REPORT ecx
        REPORT edx
        PASS

        .global pv_features
pv_features:                    /* KVM's paravirtual features, as the guest sees them */
        mov eax, {KVM_CPUID_FEATURES}
        xor ecx, ecx
        cpuid
        REPORT eax
        PASS

        .global hypercall_vmcall
hypercall_vmcall:               /* Intel's hypercall instruction (Linux: kvm_hypercall1) */
        mov eax, {UNKNOWN_HYPERCALL}
        xor ebx, ebx
        vmcall
        REPORT eax
        PASS

        .global hypercall_vmmcall
hypercall_vmmcall:              /* AMD's */
        mov eax, {UNKNOWN_HYPERCALL}
        xor ebx, ebx
        vmmcall
        REPORT eax
        PASS

wrong_result:
        mov eax, {WRONG_RESULT}
        out DONE_PORT, eax

        .global insn_clac
insn_clac:
        clac
        PASS
        .global insn_stac
insn_stac:
        stac
        PASS
        .global insn_popcnt
insn_popcnt:
        mov rbx, 0xF0F0
        popcnt rax, rbx
        cmp rax, 8
        jne wrong_result
        PASS
        .global insn_lzcnt
insn_lzcnt:                     /* LZCNT of 1 is 63; BSR of 1 would be 0 */
        mov eax, 0x80000001
        xor ecx, ecx
        cpuid
        REPORT ecx              /* bit 5: LZCNT (Linux's "abm") */
        mov rbx, 1
        mov rax, 0x5a5a
        lzcnt rax, rbx
        REPORT eax
        PASS
        .global insn_tzcnt
insn_tzcnt:                     /* TZCNT of 0 is 64; BSF of 0 leaves its destination */
        mov eax, 7
        xor ecx, ecx
        cpuid
        REPORT ebx              /* bit 3: BMI1 */
        xor ebx, ebx
        mov rax, 0x5a5a
        tzcnt rax, rbx
        REPORT eax
        PASS
        .global insn_lsl
insn_lsl:
        mov eax, {KERNEL_DS}
        lsl ebx, eax            /* the flat kernel data segment: limit 0xffffffff */
        jnz wrong_result
        cmp ebx, 0xffffffff
        jne wrong_result
        PASS
        .global insn_xsave
insn_xsave:
        lea rdi, [rip + xsave_area]
        mov eax, 1              /* x87 state only: XCR0 is 1 after reset */
        xor edx, edx
        xsave [rdi]
        PASS
        .global insn_xrstor
insn_xrstor:
        lea rdi, [rip + xsave_area]
        mov eax, 1              /* an all-zero header: restore x87 to its init state */
        xor edx, edx
        xrstor [rdi]
        PASS
        .global insn_int3
insn_int3:
        int3
        PASS
        .global return_from_interrupt
return_from_interrupt:
        iretq
        .global insn_pshufb
insn_pshufb:
        pshufb xmm0, xmm1
        PASS
        .global insn_ldmxcsr
insn_ldmxcsr:
        ldmxcsr [rip + mxcsr_default]
        PASS
        .global insn_fwait
insn_fwait:
        fwait
        PASS
        .global insn_cmpxchg16b
insn_cmpxchg16b:
        lea rdi, [rip + cmpxchg_area]
        xor eax, eax
        xor edx, edx
        mov ebx, 1
        xor ecx, ecx
        lock cmpxchg16b [rdi]
        jne wrong_result
        cmp qword ptr [rdi], 1
        jne wrong_result
        PASS

        .global early_eoi
early_eoi:                      /* a level MSI arrives; what does its handler see? */
        movabs rbx, {LAPIC_ADDRESS}
        out SIGNAL_PORT, al
        sti
        hlt
        cli
        PASS
        .global level_handler
level_handler:
        REPORT [rbx + LAPIC_ISR + (LEVEL_VECTOR / 32) * 16]
        REPORT [rbx + LAPIC_TMR + (LEVEL_VECTOR / 32) * 16]
        mov dword ptr [rbx + LAPIC_EOI], 0
        iretq

        .global deferred_injection
deferred_injection:             /* an interrupt pending at STI: taken when? */
        movabs rbx, {LAPIC_ADDRESS}
        mov dword ptr [rip + taken_at], -1
        out SIGNAL_PORT, al
        mov ecx, {DEFERRED_LOOP}
        sti
1:      dec ecx
        jnz 1b
        mov eax, [rip + taken_at]
        out REPORT_PORT, eax
        cli
        PASS
        .global edge_handler
edge_handler:
        mov [rip + taken_at], ecx
        mov dword ptr [rbx + LAPIC_EOI], 0
        iretq

        .global syscall_entry
syscall_entry:                  /* LSTAR, in a supervisor-only page as in Linux */
        mov eax, cs
        out REPORT_PORT, eax
        PASS
        .global page_fault_handler_smap
page_fault_handler_smap:        /* Linux's entries begin with CLAC where SMAP exists */
        clac
        .global page_fault_handler
page_fault_handler:
        REPORT [rsp + 16]       /* the faulting frame's CS (error code, RIP, CS...) */
        mov rax, cr2
        out REPORT_PORT, eax
        mov eax, EXCEPTION_BASE + 14
        out DONE_PORT, eax

{_EXCEPTION_STUBS}

        .balign 4096
        .global user_page
user_page:                      /* the only page user mode may touch */
        .global user_count_loop
user_count_loop:
1:      dec rcx
        jnz 1b
        PASS
        .global user_syscall
user_syscall:
        syscall
        mov eax, {RETURNED_FROM_SYSCALL}
        out DONE_PORT, eax
        .balign 4096

        .code32
        .global iret32
iret32:                         /* 32-bit protected mode, paging off */
        pushfd
        push 0x08
        push offset 1f
        iretd
1:      mov eax, {PASSED}
        out DONE_PORT, eax
        .code64

        .data
        .balign 64
xsave_area:
        .fill 1024, 1, 0
        .balign 16
cmpxchg_area:
        .quad 0, 0
mxcsr_default:
        .long 0x1F80
taken_at:
        .long 0
"""


@dataclass
class ProbeRun:
    """How one probe guest ended, and what it reported on the way."""

    ending: str  # "done", "emulation-failure", "triple-fault", "timeout", "error"
    value: int = 0  # done: what the guest wrote to DONE_PORT
    reports: list[int] = field(default_factory=list)
    events: list[tuple[str, int]] = field(default_factory=list)  # ("report"|"eoi", value)
    instruction: bytes = b""
    detail: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.ending == "done" and self.value == PASSED

    @property
    def exception(self) -> int | None:
        if self.ending == "done" and EXCEPTION_BASE <= self.value < EXCEPTION_BASE + 32:
            return self.value - EXCEPTION_BASE
        return None


@dataclass
class _Recorder:
    """The probe's report port (a kvm_devices Device) and the host's side of SIGNAL_PORT."""

    run: ProbeRun
    on_signal: Callable[[], object] | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.run.reports.append(value)
        self.run.events.append(("report", value))

    def eoi(self, vector: int) -> None:
        self.run.events.append(("eoi", vector))


@dataclass
class _SignalPort:
    recorder: _Recorder

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self.recorder.on_signal is not None:
            self.recorder.on_signal()


@dataclass
class ProbeGuest:
    """Runs entries of the assembled probe program, each in a fresh one-vCPU VM."""

    kvm: kvmfast.Kvm
    program: GuestProgram
    cpuid: list[CpuidEntry]
    timeout: float = 2.0

    def run(
        self,
        entry: str,
        *,
        mode: ProbeMode = "kernel",
        regs: Regs | None = None,
        handlers: Mapping[int, str] | None = None,
        on_signal: Callable[[kvmfast.Vm], object] | None = None,
        cpuid: list[CpuidEntry] | None = None,
        msrs: Mapping[int, int] | None = None,
    ) -> ProbeRun:
        vm = self.kvm.create_vm("split", 24)
        try:
            return self._run_in(vm, entry, mode, regs, handlers, on_signal, cpuid, msrs)
        finally:
            vm.close()

    def _run_in(
        self,
        vm: kvmfast.Vm,
        entry: str,
        mode: ProbeMode,
        regs: Regs | None,
        handlers: Mapping[int, str] | None,
        on_signal: Callable[[kvmfast.Vm], object] | None,
        cpuid: list[CpuidEntry] | None,
        msrs: Mapping[int, int] | None,
    ) -> ProbeRun:
        symbols = self.program.symbols
        vm.add_memory(0, PROBE_RAM)
        vm.write(PROGRAM_ORIGIN, self.program.code)
        result = ProbeRun("error")
        recorder = _Recorder(result, None if on_signal is None else lambda: on_signal(vm))
        vm.add_pio(REPORT_PORT, 4, recorder)
        vm.add_pio(SIGNAL_PORT, 1, _SignalPort(recorder))
        vm.add_pio(DONE_PORT, 4, kvmfast.ExitSink())
        vcpu = vm.create_vcpu(0)
        guest_cpuid = self.cpuid if cpuid is None else cpuid
        vcpu.set_cpuid(guest_cpuid)
        vcpu.set_eoi_handler(recorder.eoi)
        page = bytearray(vcpu.get_lapic())
        struct.pack_into("<I", page, LAPIC_SVR, LAPIC_SVR_ENABLED)
        vcpu.set_lapic(bytes(page))
        if mode == "protected32":
            _enter_protected_mode(vm, vcpu)
        else:
            user_pages = (symbols["user_page"], symbols["user_page"] + 0x1000)
            vm.write(PAGE_TABLES, page_tables(PAGE_TABLES, user_pages))
            vm.write(GDT_ADDRESS, gdt64(TSS_ADDRESS))
            vm.write(TSS_ADDRESS, struct.pack("<IQ", 0, KERNEL_STACK).ljust(104, b"\0"))
            gates = {vector: symbols[f"exception_{vector}"] for vector in range(32)}
            gates.update({v: symbols[name] for v, name in (handlers or {}).items()})
            vm.write(IDT_ADDRESS, _idt64(gates))
            try:
                # KVM's own CPUID may deny XSAVE while the guest still sees the host's
                # (../shared/HOST-KVM.md): what KVM accepts in CR4 decides.
                vcpu.set_sregs(_long_mode_sregs(user=mode == "user", xsave=True))
            except OSError:
                vcpu.set_sregs(_long_mode_sregs(user=mode == "user", xsave=False))
        if msrs:
            vcpu.set_msrs(dict(msrs))
        start = dict(regs or {})
        start.setdefault("rsp", KERNEL_STACK)
        start["rip"] = symbols[entry]
        start["rflags"] = RFLAGS_IOPL3 if mode == "user" else 2
        vcpu.set_regs(start)
        kicker = vcpu.kicker()
        watchdog = threading.Timer(self.timeout, kicker.stop)
        watchdog.start()
        began = time.perf_counter()
        try:
            exit_ = vcpu.run()
            result.seconds = time.perf_counter() - began
            if exit_.reason == "device_exit":
                result.ending, result.value = "done", exit_.value
            elif exit_.reason == "stopped":
                result.ending, result.detail = "timeout", f"no end within {self.timeout} s"
            else:
                result.ending, result.detail = "error", f"exit {exit_.reason} {exit_.value}"
        except kvmfast.EmulationFailure as error:
            result.ending, result.instruction = "emulation-failure", bytes(error.insn_bytes)
            result.detail = f"RIP {error.regs.get('rip', 0):#x}"
        except kvmfast.TripleFault:
            result.ending = "triple-fault"
        except kvmfast.GuestStop as error:
            result.ending, result.detail = "error", str(error)
        finally:
            watchdog.cancel()
        return result


def cpuid_bit(
    entries: Iterable[CpuidEntry], leaf: int, subleaf: int, reg: Register, bit: int
) -> bool:
    index = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}[reg]
    for entry in entries:
        if entry[0] == leaf and entry[1] == subleaf:
            return bool(entry[index] >> bit & 1)
    return False


def page_tables(base: int, user_range: tuple[int, int]) -> bytes:
    """4 GiB identity-mapped; 4 KiB pages in the first 2 MiB so that only the
    user page is user-accessible (the upper levels allow user access)."""
    present_writable, user, huge = 0x3, 0x4, 0x80
    pml4 = struct.pack("<Q", (base + 0x1000) | present_writable | user).ljust(0x1000, b"\0")
    directories = [base + 0x2000 + 0x1000 * gib for gib in range(4)]
    pdpt = b"".join(struct.pack("<Q", d | present_writable | user) for d in directories)
    page_table = base + 0x6000
    tables = [pml4, pdpt.ljust(0x1000, b"\0")]
    for gib in range(4):
        entries = [(gib << 30) | (i << 21) | present_writable | huge for i in range(512)]
        if gib == 0:
            entries[0] = page_table | present_writable | user
        tables.append(struct.pack("<512Q", *entries))
    small = []
    for i in range(512):
        address = i << 12
        flags = present_writable | (user if user_range[0] <= address < user_range[1] else 0)
        small.append(address | flags)
    tables.append(struct.pack("<512Q", *small))
    return b"".join(tables)


def gdt64(tss: int) -> bytes:
    code64, data = x86.GDT_CODE64, x86.GDT_DATA
    user = 3 << 45  # DPL 3
    tss_low = 0x67 | (tss & 0xFFFFFF) << 16 | 0x89 << 40 | (tss >> 24 & 0xFF) << 56
    user_and_tss = struct.pack("<4Q", code64 | user, data | user, tss_low, tss >> 32)
    return x86.flat_guest_gdt(long_mode=True) + user_and_tss


def _idt64(gates: Mapping[int, int]) -> bytes:
    table = bytearray(256 * 16)
    for vector, handler in gates.items():
        struct.pack_into(
            "<HHBBHII",
            table,
            vector * 16,
            handler & 0xFFFF,
            KERNEL_CS,
            0,
            0x8E,
            handler >> 16 & 0xFFFF,
            handler >> 32,
            0,
        )
    return bytes(table)


def _long_mode_sregs(*, user: bool, xsave: bool) -> Sregs:
    dpl = 3 if user else 0
    code = x86.flat_segment(USER_CS if user else KERNEL_CS, code=True, long_mode=True, dpl=dpl)
    data = x86.flat_segment(USER_DS if user else KERNEL_DS, code=False, long_mode=True, dpl=dpl)
    tr: Segment = {
        "base": TSS_ADDRESS,
        "limit": 0x67,
        "selector": TSS_SELECTOR,
        "type": 11,
        "present": 1,
        "dpl": 0,
        "db": 0,
        "s": 0,
        "l": 0,
        "g": 0,
        "avl": 0,
        "unusable": 0,
    }
    cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_OSXSAVE if xsave else 0)
    return {
        "cs": code,
        "ds": data,
        "es": data,
        "fs": data,
        "gs": data,
        "ss": data,
        "tr": tr,
        "gdt": {"base": GDT_ADDRESS, "limit": 7 * 8 - 1},
        "idt": {"base": IDT_ADDRESS, "limit": 256 * 16 - 1},
        "cr0": CR0_PG | CR0_NE | CR0_ET | CR0_MP | CR0_PE,
        "cr3": PAGE_TABLES,
        "cr4": cr4,
        "efer": EFER_LMA | EFER_LME | EFER_SCE,
    }


def _enter_protected_mode(vm: kvmfast.Vm, vcpu: kvmfast.Vcpu) -> None:
    gdt = x86.flat_guest_gdt(long_mode=False)
    vm.write(GDT32_ADDRESS, gdt)
    code = x86.flat_segment(x86.FLAT_GUEST_CS, code=True, long_mode=False)
    flat = x86.flat_segment(x86.FLAT_GUEST_DS, code=False, long_mode=False)
    vcpu.set_sregs(
        {
            "cs": code,
            "ds": flat,
            "es": flat,
            "fs": flat,
            "gs": flat,
            "ss": flat,
            "gdt": {"base": GDT32_ADDRESS, "limit": len(gdt) - 1},
            "cr0": CR0_ET | CR0_PE,
            "cr3": 0,
            "cr4": 0,
            "efer": 0,
        }
    )


def build_probe_program() -> GuestProgram:
    """Assemble the probes (raises AssemblerMissing or AssemblyError)."""
    return assemble_program(PROBE_SOURCE, bits=64, origin=PROGRAM_ORIGIN)
