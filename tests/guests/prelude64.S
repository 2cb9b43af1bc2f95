/*
 * Common start of the test guests: 64-bit long mode, the first 4 GiB
 * identity-mapped, entered by kvm_vmm.cpu_setup at _start (CS = 0x10).
 * 64-bit because this is what the kernels we run use, and because some hosts'
 * KVM cannot complete a 32-bit protected-mode IRET (see docs/host-notes.md).
 *
 * Conventions shared with tests/guests/__init__.py:
 *   port 0x98 (REPORT_PORT, 4 bytes): the guest reports a value (out 0x98, eax)
 *   port 0xF4 (EXIT_PORT):  isa-debug-exit; the VMM's status is (value << 1) | 1
 *   LAPIC at 0xFEE00000, IOAPIC at 0xFEC00000 (reached through a register:
 *   a 32-bit absolute address above 2 GiB would be sign-extended)
 * The including file defines `main`, which returns a status in eax.
 */
        .intel_syntax noprefix
        .code64
        .text
        .globl _start
_start:
        mov rsp, 0x80000
        call install_default_gates
        lidt [idt_descriptor]
        /* Mask both 8259s: with the IOAPIC in use, as Linux does. */
        mov al, 0xFF
        out 0x21, al
        out 0xA1, al
        call main
        out 0xF4, eax
1:      hlt
        jmp 1b

        .set REPORT_PORT, 0x98
        .set LAPIC, 0xFEE00000
        .set LAPIC_EOI, 0xB0
        .set LAPIC_SVR, 0xF0
        .set LAPIC_LINT0, 0x350
        .set LAPIC_LINT1, 0x360
        .set IOAPIC, 0xFEC00000

/* Interrupt gate for vector \vec to \handler (64-bit, DPL 0, CS 0x10, no IST). */
        .macro SET_GATE vec, handler
        push rax
        lea rax, [rip + \handler]
        mov word ptr [idt + \vec * 16], ax
        mov word ptr [idt + \vec * 16 + 2], 0x10
        mov word ptr [idt + \vec * 16 + 4], 0x8E00
        shr rax, 16
        mov word ptr [idt + \vec * 16 + 6], ax
        shr rax, 16
        mov dword ptr [idt + \vec * 16 + 8], eax
        pop rax
        .endm

        .macro REPORT value
        push rax
        mov eax, \value
        out REPORT_PORT, eax
        pop rax
        .endm

/* Report Remote IRR (bit 14) of IOAPIC redirection entry \pin. Keeps registers. */
        .macro REPORT_REMOTE_IRR pin
        push rax
        push rcx
        mov ecx, \pin
        call ioapic_get_entry
        and eax, 1 << 14
        REPORT eax
        pop rcx
        pop rax
        .endm

/* Write \value to the LAPIC register at offset \reg. */
        .macro LAPIC_WRITE reg, value
        push rax
        mov eax, LAPIC + \reg
        mov dword ptr [rax], \value
        pop rax
        .endm

/* A vector nobody expected: report 0xBAD000vv and fail. */
unexpected_vector:
        pop rax
        or eax, 0xBAD00000
        out REPORT_PORT, eax
        mov eax, 0xBAD
        out 0xF4, eax
3:      hlt
        jmp 3b

/* The LAPIC software-enabled, spurious vector 0xFF. */
lapic_enable:
        LAPIC_WRITE LAPIC_SVR, 0x1FF
        ret

lapic_eoi:
        LAPIC_WRITE LAPIC_EOI, 0
        ret

/* IOAPIC redirection entry ecx: low dword eax, high dword edx. Keeps registers. */
ioapic_set_entry:
        push rbx
        push rcx
        mov ebx, IOAPIC
        shl ecx, 1
        add ecx, 0x10
        mov dword ptr [rbx], ecx
        mov dword ptr [rbx + 0x10], eax
        inc ecx
        mov dword ptr [rbx], ecx
        mov dword ptr [rbx + 0x10], edx
        pop rcx
        pop rbx
        ret

/* eax = low dword of IOAPIC redirection entry ecx. */
ioapic_get_entry:
        push rbx
        push rcx
        mov ebx, IOAPIC
        shl ecx, 1
        add ecx, 0x10
        mov dword ptr [rbx], ecx
        mov eax, dword ptr [rbx + 0x10]
        pop rcx
        pop rbx
        ret

/* eax = IOAPIC indirect register ecx. */
ioapic_read:
        push rbx
        mov ebx, IOAPIC
        mov dword ptr [rbx], ecx
        mov eax, dword ptr [rbx + 0x10]
        pop rbx
        ret

/* Spin with interrupts enabled for ecx iterations (lets pending interrupts in). */
spin_sti:
        sti
2:      nop
        dec ecx
        jnz 2b
        ret
