/*
 * A guest for snapshot/restore tests (issue 17): its output depends only on its
 * input, never on timing, and on every piece of CPU and device state a snapshot
 * must carry. Phases, each announced on COM1 so the host can stop it there:
 *
 *  1. "phase 1: counting": the PIT (channel 0, mode 2, ~1 kHz) through our IOAPIC
 *     (ISA IRQ0 on GSI 2, edge) and the in-kernel LAPIC timer (TSC-deadline mode
 *     where CPUID offers it, else periodic) tick at once; each counts to its own
 *     target, then masks itself. Every PIT tick folds its number into a running
 *     checksum held in vector registers (YMM0/1/3 with AVX2, XMM0/1/3 with SSE2
 *     only), every LAPIC tick into another one (YMM6/7). Nothing saves these
 *     registers anywhere: the handlers do not, and neither does main, so a vector
 *     state lost or corrupted by a snapshot changes the checksums.
 *  2. "serial> ": COM1 input (IRQ4, FIFO on) until a carriage return, each byte
 *     folded into the checksum.
 *  3. "key> ": i8042 keyboard bytes (IRQ1, translated to set 1) until a break code.
 *  4. "phase 4: counting": more PIT ticks.
 *  Then one "summary:" line (mode, tick counts, keyboard interrupts that found no
 *  byte: none on a correct machine, the 8042 raises IRQ1 once per byte; CR4 and XCR0
 *  as read back, both checksums) and isa-debug-exit through main's return.
 *
 * Interrupt delivery: Intel SDM Vol. 3A 10.5.4.1 (TSC-deadline mode), 82093AA
 * datasheet 3.2.4 (redirection entries), 8254 datasheet (mode 2), PC16550D 8.6/8.7
 * (IIR, IER), IBM PS/2 8042 reference (command byte 0x45: translation, IRQ1).
 * Enabling SSE/AVX as a kernel does: SDM Vol. 1 13.1-13.3 (CPUID leaves 1, 7 and
 * 0DH; CR4.OSFXSR, OSXMMEXCPT, OSXSAVE; XCR0 = x87 | SSE | AVX through XSETBV).
 *
 * "sse2-only" on the Multiboot command line keeps it to SSE2 where the CPU has AVX2
 * (the CPUID a guest sees is the host's here, whatever KVM_SET_CPUID2 says).
 *
 * tests/guests/multiboot/snapshot_model.py computes the checksums of the same
 * steps on the host: the test compares the guest's line with it.
 */
        .include "checks.inc"

        .set PIT_VECTOR, 0x30
        .set KEYBOARD_VECTOR, 0x31
        .set SERIAL_VECTOR, 0x34
        .set LAPIC_TIMER_VECTOR, 0x40
        .set PIT_PIN, 2
        .set KEYBOARD_PIN, 1
        .set SERIAL_PIN, 4

        .set FIRST_PIT_TICKS, 300
        .set SECOND_PIT_TICKS, 200
        .set LAPIC_TICKS, 100
        .set PIT_DIVISOR, 1193          /* 1.19318 MHz / 1193: 1.000 kHz */
        .set TSC_DEADLINE_DELTA, 6000000 /* ~2 ms at this kind of host's TSC rate */
        .set LAPIC_PERIODIC_COUNT, 200000 /* divide by 16 */

        .set COM1, 0x3F8
        .set UART_IER, 1
        .set UART_FCR, 2
        .set UART_MCR, 4
        .set UART_LSR, 5
        .set I8042_DATA, 0x60
        .set I8042_STATUS, 0x64
        .set PIT_CHANNEL0, 0x40
        .set PIT_COMMAND, 0x43

        .set LAPIC_LVT_TIMER, 0x320
        .set LAPIC_TIMER_INITIAL, 0x380
        .set LAPIC_TIMER_DIVIDE, 0x3E0
        .set LVT_MASKED, 1 << 16
        .set LVT_PERIODIC, 1 << 17
        .set LVT_TSC_DEADLINE, 2 << 17
        .set MSR_TSC_DEADLINE, 0x6E0
        .set MSR_TSC, 0x10
        /* The guest sets its TSC this far ahead (~6 minutes at 3 GHz) first: where KVM
           offsets a guest's TSC, a restored TSC deadline computed against the fresh
           VM's TSC (near 0) rather than the restored one would fire minutes late, and
           a TSC not restored would go backwards. (Under kvm_pvm, 2026-12-07, the guest
           read the host's TSC whatever it wrote: there the check cannot bite.) */
        .set TSC_START_HIGH, 0x100

        .set SERIAL_MAX, 32
        .set KEYS_MAX, 8

        .set CR0_MP, 1 << 1
        .set CR0_EM, 1 << 2
        .set CR0_TS, 1 << 3
        .set CR0_NE, 1 << 5
        .set CR4_OSFXSR, 1 << 9
        .set CR4_OSXMMEXCPT, 1 << 10
        .set CR4_OSXSAVE, 1 << 18
        .set XCR0_X87_SSE_AVX, 7

/* Sleep with interrupts on until the byte at \flag is nonzero (STI's shadow covers HLT). */
        .macro WAIT_FOR flag
.Lwait\@:
        cli
        cmp byte ptr [rip + \flag], 0
        jne .Lset\@
        sti
        hlt
        jmp .Lwait\@
.Lset\@:
        sti
        .endm

        .text
        .globl main
main:
        push rbx
        push r12
        call enable_vector_state
        call load_seeds
        SET_GATE PIT_VECTOR, pit_interrupt
        SET_GATE LAPIC_TIMER_VECTOR, lapic_timer_interrupt
        SET_GATE SERIAL_VECTOR, serial_interrupt
        SET_GATE KEYBOARD_VECTOR, keyboard_interrupt
        PRINT "snapshot guest: mode "
        lea rdi, [rip + sse_name]
        lea rax, [rip + avx2_name]
        cmp byte ptr [rip + avx2], 0
        cmovne rdi, rax
        call puts
        PRINT ", LAPIC timer "
        lea rdi, [rip + periodic_name]
        lea rax, [rip + deadline_name]
        cmp byte ptr [rip + tsc_deadline], 0
        cmovne rdi, rax
        call puts
        PRINT "\n"

        /* ---- phase 1: two timers at once */
        PRINT "phase 1: counting\n"
        mov ecx, MSR_TSC
        xor eax, eax
        mov edx, TSC_START_HIGH
        wrmsr
        mov dword ptr [rip + pit_target], FIRST_PIT_TICKS
        call start_pit
        call start_lapic_timer
        WAIT_FOR pit_done
        WAIT_FOR lapic_done
        PRINT "phase 1 done\n"

        /* ---- phase 2: a line on COM1 */
        call start_serial_input
        PRINT "serial> "
        WAIT_FOR serial_done
        IOAPIC_ENTRY SERIAL_PIN, SERIAL_VECTOR|RTE_MASKED
        PRINT "\nserial:"
        lea rbx, [rip + serial_buffer]
        mov r12d, [rip + serial_length]
        call mix_and_print_bytes

        /* ---- phase 3: a key */
        call start_keyboard_input
        PRINT "key> "
        WAIT_FOR keys_done
        IOAPIC_ENTRY KEYBOARD_PIN, KEYBOARD_VECTOR|RTE_MASKED
        PRINT "\nkey:"
        lea rbx, [rip + key_buffer]
        mov r12d, [rip + key_length]
        call mix_and_print_bytes

        /* ---- phase 4: the PIT again */
        PRINT "phase 4: counting\n"
        mov byte ptr [rip + pit_done], 0
        mov dword ptr [rip + pit_target], FIRST_PIT_TICKS + SECOND_PIT_TICKS
        IOAPIC_ENTRY PIT_PIN, PIT_VECTOR
        WAIT_FOR pit_done
        PRINT "phase 4 done\n"

        cli
        cmp byte ptr [rip + tsc_went_back], 0
        CHECK e, 2, "the TSC went backwards between two LAPIC timer ticks"
        rdtsc
        cmp edx, TSC_START_HIGH
        CHECK ae, 3, "the TSC is below the value the guest wrote"
        call print_summary
        xor eax, eax
        pop r12
        pop rbx
        ret

/* Fold the r12d bytes at rbx into the checksum (interrupts off: the PIT handler shares
   the registers) and print each as " 0x..". */
mix_and_print_bytes:
1:      test r12d, r12d
        jz 2f
        movzx eax, byte ptr [rbx]
        cli
        call mix
        sti
        mov edi, ' '
        call putc
        movzx edi, byte ptr [rbx]
        call put_hex
        inc rbx
        dec r12d
        jmp 1b
2:      mov edi, '\n'
        jmp putc

/* ------------------------------------------------------------ vector state */

/* CPUID decides: AVX2 (with XSAVE, AVX and XCR0's AVX state) or SSE2 only. */
enable_vector_state:
        push rbx
        mov eax, 1
        cpuid
        test edx, 1 << 26
        CHECK nz, 1, "no SSE2"
        bt ecx, 24
        setc byte ptr [rip + tsc_deadline]
        mov rax, cr0
        and rax, ~(CR0_EM | CR0_TS)
        or rax, CR0_MP | CR0_NE
        mov cr0, rax
        mov rax, cr4
        or rax, CR4_OSFXSR | CR4_OSXMMEXCPT
        mov cr4, rax
        bt ecx, 26                      /* XSAVE */
        jnc 1f
        bt ecx, 28                      /* AVX */
        jnc 1f
        xor eax, eax
        cpuid
        cmp eax, 0xD
        jb 1f
        mov eax, 7
        xor ecx, ecx
        cpuid
        bt ebx, 5                       /* AVX2 */
        jnc 1f
        mov eax, 0xD
        xor ecx, ecx
        cpuid
        and eax, 6                      /* XCR0 may hold SSE and AVX state */
        cmp eax, 6
        jne 1f
        call sse2_only_asked
        test eax, eax
        jnz 1f
        mov rax, cr4
        or rax, CR4_OSXSAVE
        mov cr4, rax
        xor ecx, ecx
        xor edx, edx
        mov eax, XCR0_X87_SSE_AVX
        xsetbv
        mov byte ptr [rip + avx2], 1
1:      pop rbx
        ret

/* eax = 1 if the Multiboot command line (info flags bit 2) holds "sse2-only". */
sse2_only_asked:
        xor eax, eax
        mov rdx, [rip + multiboot_info]
        test dword ptr [rdx], 1 << 2
        jz 3f
        mov esi, [rdx + 16]
1:      lea rdi, [rip + sse2_only_option]
        xor ecx, ecx
2:      movzx edx, byte ptr [rdi + rcx]
        test edx, edx
        jz 4f                           /* the whole option matched */
        cmp dl, [rsi + rcx]
        jne 5f
        inc ecx
        jmp 2b
5:      cmp byte ptr [rsi], 0
        je 3f
        inc rsi
        jmp 1b
4:      mov eax, 1
3:      ret

/* The checksums' starting values: A, D and S of the PIT's, L and M of the LAPIC's. */
load_seeds:
        cmp byte ptr [rip + avx2], 0
        je 1f
        vmovdqu ymm0, [rip + seed_a]
        vmovdqu ymm1, [rip + seed_d]
        vmovdqu ymm3, [rip + seed_s]
        vmovdqu ymm6, [rip + seed_l]
        vmovdqu ymm7, [rip + seed_m]
        ret
1:      movdqu xmm0, [rip + seed_a]
        movdqu xmm1, [rip + seed_d]
        movdqu xmm3, [rip + seed_s]
        movdqu xmm6, [rip + seed_l]
        movdqu xmm7, [rip + seed_m]
        ret

/* One step of the PIT checksum with the value eax (snapshot_model.mix):
   D += S; A ^= D; A = rotl32(A, 7); A = A rotated by one qword (AVX2: across the
   whole YMM; SSE: dwords in the XMM); A += broadcast(eax). Clobbers XMM/YMM4, 5. */
mix:
        cmp byte ptr [rip + avx2], 0
        je 1f
        vmovd xmm5, eax
        vpbroadcastd ymm5, xmm5
        vpaddd ymm1, ymm1, ymm3
        vpxor ymm0, ymm0, ymm1
        vpslld ymm4, ymm0, 7
        vpsrld ymm0, ymm0, 25
        vpor ymm0, ymm0, ymm4
        vpermq ymm0, ymm0, 0x39
        vpaddd ymm0, ymm0, ymm5
        ret
1:      movd xmm5, eax
        pshufd xmm5, xmm5, 0
        paddd xmm1, xmm3
        pxor xmm0, xmm1
        movdqa xmm4, xmm0
        pslld xmm4, 7
        psrld xmm0, 25
        por xmm0, xmm4
        pshufd xmm0, xmm0, 0x39
        paddd xmm0, xmm5
        ret

/* One step of the LAPIC checksum with the value eax (snapshot_model.lapic_mix):
   L ^= M; L += broadcast(eax); L = L's dwords rotated within each 128-bit lane. */
lapic_mix:
        cmp byte ptr [rip + avx2], 0
        je 1f
        vmovd xmm8, eax
        vpbroadcastd ymm8, xmm8
        vpxor ymm6, ymm6, ymm7
        vpaddd ymm6, ymm6, ymm8
        vpshufd ymm6, ymm6, 0x93
        ret
1:      movd xmm8, eax
        pshufd xmm8, xmm8, 0
        pxor xmm6, xmm7
        paddd xmm6, xmm8
        pshufd xmm6, xmm6, 0x93
        ret

/* ------------------------------------------------------------------ timers */

start_pit:
        IOAPIC_ENTRY PIT_PIN, PIT_VECTOR
        mov al, 0x34                    /* channel 0, lobyte/hibyte, mode 2, binary */
        out PIT_COMMAND, al
        mov al, PIT_DIVISOR & 0xFF
        out PIT_CHANNEL0, al
        mov al, PIT_DIVISOR >> 8
        out PIT_CHANNEL0, al
        ret

        INTERRUPT_HANDLER pit_interrupt, pit_tick
/* A tick after the target (one already in the LAPIC's IRR when the pin was masked)
   is taken and not counted. */
pit_tick:
        mov eax, [rip + pit_ticks]
        cmp eax, [rip + pit_target]
        jae 1f
        inc eax
        mov [rip + pit_ticks], eax
        call mix
        mov eax, [rip + pit_ticks]
        cmp eax, [rip + pit_target]
        jb 1f
        IOAPIC_ENTRY PIT_PIN, PIT_VECTOR|RTE_MASKED
        mov byte ptr [rip + pit_done], 1
1:      jmp lapic_eoi

start_lapic_timer:
        cmp byte ptr [rip + tsc_deadline], 0
        je 1f
        mov edi, LAPIC_LVT_TIMER
        mov esi, LAPIC_TIMER_VECTOR | LVT_TSC_DEADLINE
        call lapic_write
        jmp arm_tsc_deadline
1:      mov edi, LAPIC_TIMER_DIVIDE
        mov esi, 3                      /* divide by 16 */
        call lapic_write
        mov edi, LAPIC_LVT_TIMER
        mov esi, LAPIC_TIMER_VECTOR | LVT_PERIODIC
        call lapic_write
        mov edi, LAPIC_TIMER_INITIAL
        mov esi, LAPIC_PERIODIC_COUNT
        jmp lapic_write

/* IA32_TSC_DEADLINE = TSC + TSC_DEADLINE_DELTA (SDM Vol. 3A 10.5.4.1). */
arm_tsc_deadline:
        rdtsc
        shl rdx, 32
        or rax, rdx
        add rax, TSC_DEADLINE_DELTA
        mov rdx, rax
        shr rdx, 32
        mov ecx, MSR_TSC_DEADLINE
        wrmsr
        ret

        INTERRUPT_HANDLER lapic_timer_interrupt, lapic_tick
lapic_tick:
        rdtsc
        shl rdx, 32
        or rax, rdx
        cmp rax, [rip + last_tsc]
        jae 3f
        mov byte ptr [rip + tsc_went_back], 1
3:      mov [rip + last_tsc], rax
        mov eax, [rip + lapic_ticks]
        cmp eax, LAPIC_TICKS
        jae 2f
        inc eax
        mov [rip + lapic_ticks], eax
        call lapic_mix
        cmp dword ptr [rip + lapic_ticks], LAPIC_TICKS
        jae 1f
        cmp byte ptr [rip + tsc_deadline], 0
        je 2f
        call arm_tsc_deadline
        jmp 2f
1:      mov edi, LAPIC_LVT_TIMER
        mov esi, LAPIC_TIMER_VECTOR | LVT_MASKED
        call lapic_write
        mov edi, LAPIC_TIMER_INITIAL
        xor esi, esi
        call lapic_write
        mov byte ptr [rip + lapic_done], 1
2:      jmp lapic_eoi

/* ------------------------------------------------------------------- input */

start_serial_input:
        mov dx, COM1 + UART_FCR
        mov al, 0x07                    /* FIFOs on and cleared, trigger level 1 */
        out dx, al
        mov dx, COM1 + UART_MCR
        mov al, 0x0B                    /* DTR, RTS, OUT2 (the IRQ gate on a PC) */
        out dx, al
        mov dx, COM1 + UART_IER
        mov al, 0x01                    /* received data available */
        out dx, al
        IOAPIC_ENTRY SERIAL_PIN, SERIAL_VECTOR
        ret

        INTERRUPT_HANDLER serial_interrupt, serial_receive
/* Drain the FIFO; a carriage return ends the line (bytes beyond SERIAL_MAX dropped). */
serial_receive:
        lea rsi, [rip + serial_buffer]
1:      mov dx, COM1 + UART_LSR
        in al, dx
        test al, 1
        jz 2f
        mov dx, COM1
        in al, dx
        mov ecx, [rip + serial_length]
        cmp ecx, SERIAL_MAX
        jae 1b
        mov [rsi + rcx], al
        inc ecx
        mov [rip + serial_length], ecx
        cmp al, '\r'
        jne 1b
        mov byte ptr [rip + serial_done], 1
        jmp 1b
2:      jmp lapic_eoi

start_keyboard_input:
1:      in al, I8042_STATUS             /* anything left in the output buffer goes */
        test al, 1
        jz 2f
        in al, I8042_DATA
        jmp 1b
2:      mov al, 0x60                    /* write the command byte: */
        out I8042_STATUS, al
        mov al, 0x45                    /* translation, system flag, keyboard IRQ */
        out I8042_DATA, al
        IOAPIC_ENTRY KEYBOARD_PIN, KEYBOARD_VECTOR
        ret

        INTERRUPT_HANDLER keyboard_interrupt, keyboard_receive
/* One byte per interrupt; a break code (bit 7) ends the key. */
keyboard_receive:
        in al, I8042_STATUS
        test al, 1
        jz 2f
        in al, I8042_DATA
        mov ecx, [rip + key_length]
        cmp ecx, KEYS_MAX
        jae 1f
        lea rsi, [rip + key_buffer]
        mov [rsi + rcx], al
        inc ecx
        mov [rip + key_length], ecx
        test al, 0x80
        jz 1f
        mov byte ptr [rip + keys_done], 1
1:      jmp lapic_eoi
/* The 8042 raises IRQ1 once per byte it puts in its output buffer: an interrupt
   with the buffer empty is one no byte caused (a restore replaying an edge...). */
2:      inc dword ptr [rip + empty_key_interrupts]
        jmp lapic_eoi

/* ----------------------------------------------------------------- summary */

print_summary:
        PRINT "summary: mode "
        lea rdi, [rip + sse_name]
        lea rax, [rip + avx2_name]
        cmp byte ptr [rip + avx2], 0
        cmovne rdi, rax
        call puts
        PRINT " pit "
        mov edi, [rip + pit_ticks]
        call put_hex
        PRINT " lapic "
        mov edi, [rip + lapic_ticks]
        call put_hex
        PRINT " empty-key-interrupts "
        mov edi, [rip + empty_key_interrupts]
        call put_hex
        PRINT " cr4 "
        mov rdi, cr4
        call put_hex
        PRINT " xcr0 "
        xor edi, edi
        cmp byte ptr [rip + avx2], 0
        je 1f
        xor ecx, ecx
        xgetbv
        shl rdx, 32
        or rax, rdx
        mov rdi, rax
1:      call put_hex
        PRINT " sum "
        call print_pit_sum
        PRINT " lapic-sum "
        call print_lapic_sum
        mov edi, '\n'
        jmp putc

/* The PIT checksum's qwords, lowest first, through XMM/YMM9 and a GPR. */
print_pit_sum:
        cmp byte ptr [rip + avx2], 0
        je 1f
        vmovq rdi, xmm0
        call put_qword
        vpermq ymm9, ymm0, 0x01
        vmovq rdi, xmm9
        call put_qword
        vpermq ymm9, ymm0, 0x02
        vmovq rdi, xmm9
        call put_qword
        vpermq ymm9, ymm0, 0x03
        vmovq rdi, xmm9
        jmp put_qword
1:      movq rdi, xmm0
        call put_qword
        pshufd xmm9, xmm0, 0xEE
        movq rdi, xmm9
        jmp put_qword

print_lapic_sum:
        cmp byte ptr [rip + avx2], 0
        je 1f
        vmovq rdi, xmm6
        call put_qword
        vpermq ymm9, ymm6, 0x01
        vmovq rdi, xmm9
        call put_qword
        vpermq ymm9, ymm6, 0x02
        vmovq rdi, xmm9
        call put_qword
        vpermq ymm9, ymm6, 0x03
        vmovq rdi, xmm9
        jmp put_qword
1:      movq rdi, xmm6
        call put_qword
        pshufd xmm9, xmm6, 0xEE
        movq rdi, xmm9
        jmp put_qword

/* rdi as 16 hex digits and a ':' after it. */
put_qword:
        push rbx
        push r12
        mov rbx, rdi
        mov r12d, 60
1:      mov rax, rbx
        mov ecx, r12d
        shr rax, cl
        and eax, 15
        lea rdx, [rip + qword_digits]
        movzx edi, byte ptr [rdx + rax]
        call putc
        sub r12d, 4
        jns 1b
        mov edi, ':'
        call putc
        pop r12
        pop rbx
        ret

/* ------------------------------------------------------------------- data */
        .section .rodata
        .balign 32
/* The seeds, eight little-endian dwords each (snapshot_model.py reads them here). */
seed_a: .long 0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0, 0x082EFA98, 0xEC4E6C89
seed_d: .long 0x452821E6, 0x38D01377, 0xBE5466CF, 0x34E90C6C, 0xC0AC29B7, 0xC97C50DD, 0x3F84D5B5, 0xB5470917
seed_s: .long 0x9E3779B9, 0x7F4A7C15, 0xF39CC060, 0x5CEDC834, 0x1082276B, 0xF3A27251, 0xF86C6A11, 0xD0C18E95
seed_l: .long 0x01234567, 0x89ABCDEF, 0xFEDCBA98, 0x76543210, 0x0F1E2D3C, 0x4B5A6978, 0x8796A5B4, 0xC3D2E1F0
seed_m: .long 0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19
sse2_only_option:
        .asciz "sse2-only"
avx2_name:
        .asciz "avx2"
sse_name:
        .asciz "sse2"
deadline_name:
        .asciz "tsc-deadline"
periodic_name:
        .asciz "periodic"
qword_digits:
        .ascii "0123456789abcdef"

        .data
        .globl pit_ticks, lapic_ticks, serial_length, key_length
avx2:   .byte 0
tsc_deadline:
        .byte 0
pit_done:
        .byte 0
lapic_done:
        .byte 0
serial_done:
        .byte 0
keys_done:
        .byte 0
tsc_went_back:
        .byte 0
        .balign 8
last_tsc:
        .quad 0
        .balign 4
pit_ticks:
        .long 0
pit_target:
        .long 0
lapic_ticks:
        .long 0
serial_length:
        .long 0
key_length:
        .long 0
empty_key_interrupts:
        .long 0
serial_buffer:
        .skip SERIAL_MAX
key_buffer:
        .skip KEYS_MAX
