/*
 * The demo guest: a few hundred bytes of 64-bit code that exercise the
 * split irqchip end to end, then power the machine off through ACPI.
 *
 *  1. print a greeting on COM1 (our 16550A), polling LSR.THRE;
 *  2. program the PIT (ours) for 100 Hz and IOAPIC pin 2 (ours) to vector
 *     0x30, enable the in-kernel LAPIC, and count 10 timer interrupts with
 *     sti; hlt (each one: PIT -> IOAPIC -> reserved MSI route -> LAPIC);
 *  3. print that, then write SLP_TYP=S5 | SLP_EN to PM1a_CNT (our ACPI PM).
 *
 * Entered in long mode by kvm_vmm.cpu_setup (4 GiB identity-mapped).
 * IOAPIC_BASE, PM1A_CNT_BLK and SLP_TYP_S5 are the board's (kvm_vmm.board),
 * defined by the VMM when it assembles this file.
 */
        .intel_syntax noprefix
        .code64
        .text
        .globl _start
_start:
        mov rsp, 0x80000
        /* Mask both 8259s: interrupts go through the IOAPIC. */
        mov al, 0xFF
        out 0x21, al
        out 0xA1, al
        /* COM1: 8 data bits, no parity, one stop bit; FIFOs on. */
        mov dx, 0x3FB
        mov al, 0x03
        out dx, al
        mov dx, 0x3FA
        mov al, 0x07
        out dx, al
        lea rsi, [rip + greeting]
        call puts

        /* IDT gate 0x30 -> on_tick */
        lea rax, [rip + on_tick]
        lea rdi, [rip + idt + 0x30 * 16]
        mov word ptr [rdi], ax
        mov word ptr [rdi + 2], 0x10
        mov word ptr [rdi + 4], 0x8E00
        shr rax, 16
        mov word ptr [rdi + 6], ax
        shr rax, 16
        mov dword ptr [rdi + 8], eax
        lidt [rip + idt_descriptor]

        /* LAPIC: software enable, spurious vector 0xFF. */
        mov eax, 0xFEE000F0
        mov dword ptr [rax], 0x1FF
        /* IOAPIC pin 2 (IRQ0 after the MADT override): vector 0x30, edge, unmasked. */
        mov ebx, IOAPIC_BASE
        mov dword ptr [rbx], 0x10 + 2 * 2
        mov dword ptr [rbx + 0x10], 0x30
        mov dword ptr [rbx], 0x11 + 2 * 2
        mov dword ptr [rbx + 0x10], 0
        /* PIT channel 0: mode 2 (rate generator), 1193182 / 11932 = 100 Hz. */
        mov al, 0x34
        out 0x43, al
        mov ax, 11932
        out 0x40, al
        mov al, ah
        out 0x40, al

wait:   sti
        hlt
        cmp dword ptr [rip + ticks], 10
        jb wait
        cli
        lea rsi, [rip + ticked]
        call puts

        /* ACPI S5: SLP_TYP (bits 10-12), SLP_EN (bit 13), in PM1a_CNT. */
        mov dx, PM1A_CNT_BLK
        mov ax, (SLP_TYP_S5 << 10) | (1 << 13)
        out dx, ax
1:      hlt
        jmp 1b

on_tick:
        inc dword ptr [rip + ticks]
        push rax
        mov eax, 0xFEE000B0
        mov dword ptr [rax], 0
        pop rax
        iretq

/* Print the NUL-terminated string at rsi on COM1. */
puts:
        mov dx, 0x3FD
2:      in al, dx
        test al, 0x20
        jz 2b
        lodsb
        test al, al
        jz 3f
        mov dx, 0x3F8
        out dx, al
        jmp puts
3:      ret

greeting:
        .asciz "Hello from a split-irqchip guest: our 16550A, PIT and IOAPIC, KVM's LAPIC.\r\n"
ticked:
        .asciz "10 PIT ticks arrived through our IOAPIC; powering off via ACPI S5.\r\n"

        .data
        .balign 16
ticks:  .long 0
        .balign 16
idt:    .fill 512, 8, 0
idt_descriptor:
        .word 256 * 16 - 1
        .quad idt
