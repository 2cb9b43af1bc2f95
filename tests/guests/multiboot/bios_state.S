/*
 * What SeaBIOS leaves for a kernel QEMU boots, as kvm-unit-tests' realmode test
 * counts on it (kvm_vmm.bios_state): real-mode vector 08h (IVT entry at 0x20:
 * offset, then segment) on a handler that sends the master 8259 a non-specific EOI
 * and returns; 8254 counter 0 programmed in mode 2, low then high byte, binary
 * (Intel 8254 datasheet, "Read-Back Command": status bits 5-0 = 110100b); and its
 * ticks reaching the CPU through the master 8259 at the BIOS's vector 08h (boot.S
 * masked both 8259s; IRQ0 is opened again here). Waits with STI; HLT, as realmode
 * does: without the tick it never wakes.
 */
        .include "checks.inc"

        .set IVT_TIMER_ENTRY, 0x08 * 4
        .set HANDLER_BYTES_0_3, 0xE620B050   /* push ax; mov al, 20h; out (20h) */
        .set HANDLER_BYTES_4_5, 0x5820       /* (out) 20h, al; pop ax */
        .set HANDLER_BYTE_6, 0xCF            /* iret */
        .set PIT_COUNTER0, 0x40
        .set PIT_CONTROL, 0x43
        .set READ_BACK_STATUS_COUNTER0, 0xE2
        .set MODE2_LOW_HIGH_BINARY, 0x34
        .set PIC_MASTER_COMMAND, 0x20
        .set PIC_MASTER_DATA, 0x21
        .set TICKS_WANTED, 3

        .text
        .globl main
main:
        push rbx
        mov ebx, IVT_TIMER_ENTRY
        movzx eax, word ptr [rbx]
        movzx ecx, word ptr [rbx + 2]
        shl ecx, 4
        add ecx, eax
        cmp dword ptr [rcx], HANDLER_BYTES_0_3
        CHECK e, 1, "real-mode vector 08h: no EOI handler"
        cmp word ptr [rcx + 4], HANDLER_BYTES_4_5
        CHECK e, 2, "real-mode vector 08h: no EOI handler"
        cmp byte ptr [rcx + 6], HANDLER_BYTE_6
        CHECK e, 3, "real-mode vector 08h: the handler does not IRET"

        mov al, READ_BACK_STATUS_COUNTER0
        out PIT_CONTROL, al
        in al, PIT_COUNTER0
        and al, 0x3F
        cmp al, MODE2_LOW_HIGH_BINARY
        CHECK e, 4, "PIT counter 0 is not in mode 2, low/high byte, binary"

        SET_GATE 0x08, tick
        mov al, 0xFE
        out PIC_MASTER_DATA, al
1:      sti
        hlt
        cli
        cmp dword ptr [rip + ticks], TICKS_WANTED
        jb 1b
        PRINT "timer ticks through the 8259\n"
        pop rbx
        xor eax, eax
        ret

        INTERRUPT_HANDLER tick, count_and_eoi
count_and_eoi:
        lock inc dword ptr [rip + ticks]
        mov al, 0x20
        out PIC_MASTER_COMMAND, al
        ret

        .data
ticks:
        .long 0
