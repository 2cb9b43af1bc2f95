/*
 * Start of every Multiboot test kernel: the Multiboot (v1) header, the 32-bit
 * entry, the switch to long mode, the AP trampoline and the helpers the test
 * bodies call. Linked at 0x400000 with a body that defines `main` (and, for
 * SMP tests, `ap_main`).
 *
 * Multiboot Specification 0.6.96 section 3.2 ("Machine state") promises EAX =
 * 0x2BADB002, EBX = the information structure, protected mode with paging and
 * interrupts off; the entry checks each and fails with its own code. Nothing
 * here takes an interrupt in 32-bit mode: some hosts' KVM cannot complete a
 * 32-bit IRET (docs/host-notes.md), which is why kvm-unit-tests, too, goes to
 * long mode first.
 *
 * Built three ways (guests/multiboot/__init__.py): an ELF32 image converted from
 * the 64-bit link by objcopy, as kvm-unit-tests builds its x86 .flat files;
 * with --defsym AOUT_KLUDGE=1, a flat binary whose header carries the
 * address fields (header flags bit 16); and, with --defsym MULTIBOOT_IN_TEXT=1,
 * linked by a plain `ld -Ttext=ADDRESS` without our linker script, the header
 * opening .text as a first kernel's usually does.
 *
 * Register conventions of the helpers: System V (arguments in rdi, rsi, rdx,
 * result in rax; rax, rcx, rdx, rsi, rdi, r8-r11 may be clobbered).
 */
        .intel_syntax noprefix

        .set MB_HEADER_MAGIC, 0x1BADB002
        .set MB_BOOTLOADER_MAGIC, 0x2BADB002
        .ifdef AOUT_KLUDGE
        .set MB_FLAGS, 0x00010003       /* page-aligned modules, memory info, address fields */
        .else
        .set MB_FLAGS, 0x00000003
        .endif

        .set CODE64_SELECTOR, 0x08
        .set DATA_SELECTOR, 0x10
        .set CODE32_SELECTOR, 0x18

        .set LAPIC_BASE, 0xFEE00000
        .set LAPIC_ID, 0x20
        .set LAPIC_EOI, 0xB0
        .set LAPIC_SVR, 0xF0
        .set LAPIC_ICR_LOW, 0x300
        .set LAPIC_ICR_HIGH, 0x310
        .set ICR_DELIVERY_PENDING, 1 << 12
        .set IOAPIC_BASE, 0xFEC00000
        .set COM1, 0x3F8
        .set FW_CFG_SELECTOR, 0x510
        .set FW_CFG_DATA, 0x511
        .set TESTDEV_IRQ_BASE, 0x2000
        .set DEBUG_EXIT_PORT, 0xF4
        .set PORT61, 0x61

        /* Where the BSP copies the AP trampoline: SIPI vector 0x10. */
        .set AP_TRAMPOLINE, 0x10000
        .set MAX_CPUS, 8
        .set STACK_SIZE, 0x2000

        /* Exit codes of the boot code itself (test bodies use 1..0x5F). */
        .set FAIL_BOOT_MAGIC, 0x71
        .set FAIL_INTERRUPTS_ON, 0x72
        .set FAIL_PAGING_ON, 0x73
        .set FAIL_NOT_PROTECTED, 0x74
        .set FAIL_APIC_ID, 0x75
        .set FAIL_UNEXPECTED_VECTOR, 0x7F

        .ifdef MULTIBOOT_IN_TEXT
        .text
        .else
        .section .multiboot, "a"
        .endif
        .balign 4
mb_header:
        .long MB_HEADER_MAGIC, MB_FLAGS, -(MB_HEADER_MAGIC + MB_FLAGS)
        .ifdef AOUT_KLUDGE
        .long mb_header, image_start, data_end, bss_end, mb_entry
        .endif

/* ------------------------------------------------------------ 32-bit entry */
        .text
        .code32
        .globl mb_entry
mb_entry:
        mov esp, offset bsp_stack_top
        cmp eax, MB_BOOTLOADER_MAGIC
        mov eax, FAIL_BOOT_MAGIC
        jne fail32
        mov dword ptr [multiboot_info], ebx
        pushfd
        pop eax
        test eax, 0x200
        mov eax, FAIL_INTERRUPTS_ON
        jnz fail32
        mov eax, cr0
        test eax, 0x80000000
        mov eax, FAIL_PAGING_ON
        jnz fail32
        mov eax, cr0
        test eax, 1
        mov eax, FAIL_NOT_PROTECTED
        jz fail32

        /* Identity-map the first 4 GiB with 2 MiB pages (LAPIC and IOAPIC included). */
        lea eax, [pdpt + 3]
        mov dword ptr [pml4], eax
        lea eax, [page_directories + 3]
        mov edi, offset pdpt
        mov ecx, 4
1:      mov dword ptr [edi], eax
        add eax, 0x1000
        add edi, 8
        loop 1b
        mov edi, offset page_directories
        mov eax, 0x83                   /* present, writable, 2 MiB page */
        xor edx, edx
        mov ecx, 4 * 512
2:      mov dword ptr [edi], eax
        mov dword ptr [edi + 4], edx
        add eax, 0x200000
        adc edx, 0
        add edi, 8
        loop 2b

        lgdt [gdt_descriptor]
        call enable_long_mode32
        .byte 0xEA                      /* jmp far CODE64_SELECTOR:long_entry */
        .long long_entry
        .word CODE64_SELECTOR

/* PAE, CR3 = pml4, EFER.LME, then paging: long mode once CS is reloaded. */
enable_long_mode32:
        mov eax, cr4
        or eax, 0x20
        mov cr4, eax
        mov eax, offset pml4
        mov cr3, eax
        mov ecx, 0xC0000080
        rdmsr
        or eax, 0x100
        wrmsr
        mov eax, cr0
        or eax, 0x80000001
        mov cr0, eax
        ret

fail32:
        out DEBUG_EXIT_PORT, eax
3:      hlt
        jmp 3b

/* ------------------------------------------------------------- long mode */
        .code64
long_entry:
        call load_data_segments
        lea rsp, [rip + bsp_stack_top]
        call install_idt
        lidt [rip + idt_descriptor]
        /* Both 8259s masked: the tests use the IOAPIC, as Linux does. */
        mov al, 0xFF
        out 0x21, al
        out 0xA1, al
        call lapic_enable
        call main
        push rax
        test eax, eax
        jnz 7f
        lea rdi, [rip + pass_message]
        call puts
7:      pop rdi
        jmp guest_exit

load_data_segments:
        mov ax, DATA_SELECTOR
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov fs, ax
        mov gs, ax
        ret

/* Leave through isa-debug-exit with status edi ((edi << 1) | 1 for the VMM). */
        .globl guest_exit
guest_exit:
        mov eax, edi
        out DEBUG_EXIT_PORT, eax
4:      cli
        hlt
        jmp 4b

/* Print "FAIL: " and the message at rdi, then exit with status esi. */
        .globl fail
fail:
        push rsi
        push rdi
        lea rdi, [rip + fail_prefix]
        call puts
        pop rdi
        call puts
        mov edi, '\n'
        call putc
        pop rdi
        jmp guest_exit

/* ------------------------------------------------------------- interrupts */

/* Interrupt gate for vector edi to the handler at rsi (64-bit, DPL 0). */
        .globl set_gate
set_gate:
        shl rdi, 4
        lea rdx, [rip + idt]
        add rdx, rdi
        mov rax, rsi
        mov word ptr [rdx], ax
        mov word ptr [rdx + 2], CODE64_SELECTOR
        mov word ptr [rdx + 4], 0x8E00
        shr rax, 16
        mov word ptr [rdx + 6], ax
        shr rax, 16
        mov dword ptr [rdx + 8], eax
        mov dword ptr [rdx + 12], 0
        ret

/* Every vector fails the test, except the LAPIC's spurious vector 0xFF. */
install_idt:
        push rbx
        xor ebx, ebx
5:      mov edi, ebx
        lea rsi, [rip + unexpected_vector]
        call set_gate
        inc ebx
        cmp ebx, 0xFF
        jb 5b
        mov edi, 0xFF
        lea rsi, [rip + spurious_vector]
        call set_gate
        pop rbx
        ret

unexpected_vector:
        lea rdi, [rip + unexpected_message]
        call puts
        mov rdi, [rsp]                  /* RIP, or the error code of an exception with one */
        call put_hex
        mov edi, ' '
        call putc
        mov rdi, [rsp + 8]
        call put_hex
        mov edi, '\n'
        call putc
        mov edi, FAIL_UNEXPECTED_VECTOR
        jmp guest_exit

spurious_vector:
        iretq

/* ------------------------------------------------------------ local APIC */

        .globl lapic_read
lapic_read:                             /* eax = LAPIC register at offset edi */
        mov eax, LAPIC_BASE
        add eax, edi
        mov eax, dword ptr [rax]
        ret

        .globl lapic_write
lapic_write:                            /* LAPIC register at offset edi = esi */
        mov eax, LAPIC_BASE
        add eax, edi
        mov dword ptr [rax], esi
        ret

        .globl lapic_eoi
lapic_eoi:
        mov edi, LAPIC_EOI
        xor esi, esi
        jmp lapic_write

        .globl lapic_id
lapic_id:
        mov edi, LAPIC_ID
        call lapic_read
        shr eax, 24
        ret

/* Software-enable the LAPIC, spurious vector 0xFF. */
lapic_enable:
        mov edi, LAPIC_SVR
        mov esi, 0x1FF
        jmp lapic_write

/* eax = 1 if bit edi (a vector) is set in the 256-bit LAPIC register array at esi. */
        .globl lapic_vector_bit
lapic_vector_bit:
        push rbx
        mov ebx, edi
        mov edi, ebx
        shr edi, 5
        shl edi, 4
        add edi, esi
        call lapic_read
        mov ecx, ebx
        and ecx, 31
        shr eax, cl
        and eax, 1
        pop rbx
        ret

/* Send ICR low esi to APIC ID edi; wait until the LAPIC has sent it. */
        .globl send_ipi
send_ipi:
        push rbx
        mov ebx, esi
        shl edi, 24
        mov esi, edi
        mov edi, LAPIC_ICR_HIGH
        call lapic_write
        mov edi, LAPIC_ICR_LOW
        mov esi, ebx
        call lapic_write
6:      mov edi, LAPIC_ICR_LOW
        call lapic_read
        test eax, ICR_DELIVERY_PENDING
        jnz 6b
        pop rbx
        ret

/* ----------------------------------------------------------------- IOAPIC */

        .globl ioapic_read
ioapic_read:                            /* eax = indirect register edi */
        mov eax, IOAPIC_BASE
        mov dword ptr [rax], edi
        mov eax, dword ptr [rax + 0x10]
        ret

        .globl ioapic_write
ioapic_write:                           /* indirect register edi = esi */
        mov eax, IOAPIC_BASE
        mov dword ptr [rax], edi
        mov dword ptr [rax + 0x10], esi
        ret

/* Redirection entry of pin edi = low dword esi, high dword edx (high first). */
        .globl ioapic_set_entry
ioapic_set_entry:
        lea edi, [edi * 2 + 0x10]
        mov eax, IOAPIC_BASE
        inc edi
        mov dword ptr [rax], edi
        mov dword ptr [rax + 0x10], edx
        dec edi
        mov dword ptr [rax], edi
        mov dword ptr [rax + 0x10], esi
        ret

        .globl ioapic_entry_low
ioapic_entry_low:                       /* eax = low dword of pin edi's entry */
        lea edi, [edi * 2 + 0x10]
        jmp ioapic_read

/* ------------------------------------------------- pc-testdev, fw_cfg, exits */

/* Drive ISA line edi to level esi through pc-testdev (port 0x2000 + line). */
        .globl set_irq_line
set_irq_line:
        lea edx, [edi + TESTDEV_IRQ_BASE]
        mov eax, esi
        out dx, al
        ret

/* One exit to the VMM: where a host injects pending interrupts (docs/host-notes.md). */
        .globl vm_exit
vm_exit:
        in al, PORT61
        ret

/* eax = 1 once dword [rdi] >= esi, 0 if edx polls (one exit each) pass first. */
        .globl wait_for_count
wait_for_count:
        cmp dword ptr [rdi], esi
        jae 8f
        in al, PORT61
        dec edx
        jnz wait_for_count
        xor eax, eax
        ret
8:      mov eax, 1
        ret

/* eax = 1 once pin edi's Remote IRR is clear, 0 after esi polls. */
        .globl wait_remote_irr_clear
wait_remote_irr_clear:
        push rbx
        push r12
        mov ebx, edi
        mov r12d, esi
9:      mov edi, ebx
        call ioapic_entry_low
        test eax, 1 << 14
        jz 10f
        dec r12d
        jnz 9b
        xor eax, eax
        jmp 11f
10:     mov eax, 1
11:     pop r12
        pop rbx
        ret

/* rax = the first esi (1..8) bytes of fw_cfg item di, little-endian. */
        .globl fw_cfg_read
fw_cfg_read:
        mov ecx, esi
        mov eax, edi
        mov dx, FW_CFG_SELECTOR
        out dx, ax
        mov dx, FW_CFG_DATA
        xor r8d, r8d
        xor r9d, r9d                    /* shift */
12:     xor eax, eax
        in al, dx
        push rcx
        mov ecx, r9d
        shl rax, cl
        pop rcx
        or r8, rax
        add r9d, 8
        dec ecx
        jnz 12b
        mov rax, r8
        ret

/* ------------------------------------------------------------- COM1 output */

        .globl putc
putc:                                   /* the byte in dil */
        mov dx, COM1 + 5
13:     in al, dx
        test al, 0x20                   /* LSR: transmitter holding register empty */
        jz 13b
        mov dx, COM1
        mov eax, edi
        out dx, al
        ret

        .globl puts
puts:                                   /* the NUL-terminated string at rdi */
        push rbx
        mov rbx, rdi
14:     movzx edi, byte ptr [rbx]
        test edi, edi
        jz 15f
        call putc
        inc rbx
        jmp 14b
15:     pop rbx
        ret

        .globl put_hex
put_hex:                                /* rdi in hex, "0x" and no leading zeros */
        push rbx
        push r12
        mov rbx, rdi
        mov edi, '0'
        call putc
        mov edi, 'x'
        call putc
        mov r12d, 60
16:     mov rax, rbx                    /* skip leading zero digits, keep the last */
        mov ecx, r12d
        shr rax, cl
        and eax, 15
        jnz 17f
        test r12d, r12d
        jz 17f
        sub r12d, 4
        jmp 16b
17:     mov rax, rbx
        mov ecx, r12d
        shr rax, cl
        and eax, 15
        lea rdx, [rip + hex_digits]
        movzx edi, byte ptr [rdx + rax]
        call putc
        sub r12d, 4
        jns 17b
        pop r12
        pop rbx
        ret

/* ------------------------------------------------------------------- SMP */

/*
 * Start every other CPU with INIT, SIPI, SIPI (Intel SDM Vol. 3A 8.4.4.1,
 * "Typical BSP Initialization Sequence") and wait until edi of them are
 * online. eax = 1 if they all came, 0 if not.
 */
        .globl start_aps
start_aps:
        push rbx
        mov ebx, edi
        lea rsi, [rip + ap_trampoline]
        mov edi, AP_TRAMPOLINE
        mov ecx, offset ap_trampoline_end - ap_trampoline
        rep movsb
        xor edi, edi
        mov esi, 0xC4500                /* all excluding self, assert, INIT */
        call send_ipi
        xor edi, edi
        mov esi, 0xC4600 | (AP_TRAMPOLINE >> 12)
        call send_ipi
        xor edi, edi
        mov esi, 0xC4600 | (AP_TRAMPOLINE >> 12)
        call send_ipi
        lea rdi, [rip + aps_online]
        mov esi, ebx
        mov edx, 100000
        call wait_for_count
        pop rbx
        ret

/* Real mode at AP_TRAMPOLINE:0 after the SIPI; copied there by start_aps. */
        .code16
ap_trampoline:
        cli
        mov ax, cs
        mov ds, ax
        lgdt [ap_trampoline_gdt_descriptor - ap_trampoline]
        mov eax, cr0
        or eax, 1
        mov cr0, eax
        .byte 0x66, 0xEA                /* jmp far CODE32_SELECTOR:ap_entry32, 32-bit offset */
        .long ap_entry32
        .word CODE32_SELECTOR
ap_trampoline_gdt_descriptor:           /* a 16-bit lgdt takes 24 bits of base: gdt is below 16 MiB */
        .word gdt_end - gdt - 1
        .long gdt
ap_trampoline_end:

        .code32
ap_entry32:
        mov ax, DATA_SELECTOR
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov eax, cr4
        or eax, 0x20
        mov cr4, eax
        mov eax, offset pml4
        mov cr3, eax
        mov ecx, 0xC0000080
        rdmsr
        or eax, 0x100
        wrmsr
        mov eax, cr0
        or eax, 0x80000001
        mov cr0, eax
        .byte 0xEA
        .long ap_entry64
        .word CODE64_SELECTOR

        .code64
ap_entry64:
        mov ax, DATA_SELECTOR
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov fs, ax
        mov gs, ax
        mov eax, LAPIC_BASE + LAPIC_ID
        mov eax, dword ptr [rax]
        shr eax, 24
        cmp eax, MAX_CPUS
        jae 18f
        inc eax
        imul eax, eax, STACK_SIZE
        lea rsp, [rip + ap_stacks]
        add rsp, rax
        lidt [rip + idt_descriptor]
        call lapic_enable
        call ap_main
        lock inc dword ptr [rip + aps_online]
        jmp ap_idle
18:     mov edi, FAIL_APIC_ID
        jmp guest_exit

/* What an AP does when the body has nothing more for it: take interrupts. */
        .globl ap_idle
ap_idle:
        sti
        hlt
        jmp ap_idle

        .weak ap_main
ap_main:
        ret

/* ------------------------------------------------------------------- data */
        .section .rodata
fail_prefix:
        .asciz "FAIL: "
pass_message:
        .asciz "PASS\n"
unexpected_message:
        .asciz "FAIL: unexpected interrupt or exception, stack: "
hex_digits:
        .ascii "0123456789abcdef"

        .data
        .balign 8
gdt:
        .quad 0
        .quad 0x00AF9B000000FFFF        /* 0x08: 64-bit code */
        .quad 0x00CF93000000FFFF        /* 0x10: flat data */
        .quad 0x00CF9B000000FFFF        /* 0x18: flat 32-bit code, the APs' way in */
gdt_end:
gdt_descriptor:
        .word gdt_end - gdt - 1
        .quad gdt
idt_descriptor:
        .word 256 * 16 - 1
        .quad idt

        .globl multiboot_info
multiboot_info:
        .quad 0
        .globl aps_online
aps_online:
        .long 0

        .bss
        .balign 4096
pml4:
        .skip 4096
pdpt:
        .skip 4096
page_directories:
        .skip 4 * 4096
idt:
        .skip 256 * 16
        .balign 16
bsp_stack:
        .skip STACK_SIZE
bsp_stack_top:
        /* AP with APIC ID n uses the stack ending at ap_stacks + (n + 1) * STACK_SIZE. */
ap_stacks:
        .skip MAX_CPUS * STACK_SIZE
