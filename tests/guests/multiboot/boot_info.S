/*
 * The Multiboot information (Multiboot Specification 0.6.96 section 3.3) and
 * QEMU's fw_cfg (docs/specs/fw_cfg.rst), as a kvm-unit-tests kernel reads
 * them. Prints what the host test compares with the command line:
 *   mem_upper=<hex> cmdline=<string> cpus=<hex> ram=<hex>
 */
        .include "checks.inc"

        .set MB_INFO_MEMORY, 1 << 0
        .set MB_INFO_CMDLINE, 1 << 2
        .set MB_INFO_MMAP, 1 << 6
        .set FW_CFG_SIGNATURE, 0x00
        .set FW_CFG_ID, 0x01
        .set FW_CFG_RAM_SIZE, 0x03
        .set FW_CFG_NB_CPUS, 0x05
        .set QEMU_SIGNATURE, 0x554D4551 /* "QEMU", little-endian */

        .text
        .globl main
main:
        push rbx
        push r12
        push r13
        mov rbx, qword ptr [rip + multiboot_info]

        test dword ptr [rbx], MB_INFO_MEMORY
        CHECK nz, 1, "Multiboot flags bit 0 (mem_lower, mem_upper) is clear"
        cmp dword ptr [rbx + 4], 639
        CHECK e, 2, "mem_lower is not 639 KiB (RAM up to the EBDA at 0x9FC00)"
        PRINT "mem_upper="
        mov edi, dword ptr [rbx + 8]
        call put_hex

        test dword ptr [rbx], MB_INFO_CMDLINE
        CHECK nz, 3, "Multiboot flags bit 2 (cmdline) is clear"
        PRINT " cmdline="
        mov edi, dword ptr [rbx + 16]
        call puts

        /* The memory map's usable RAM must cover what mem_upper says. */
        test dword ptr [rbx], MB_INFO_MMAP
        CHECK nz, 4, "Multiboot flags bit 6 (mmap) is clear"
        mov esi, dword ptr [rbx + 48]   /* mmap_addr */
        mov ecx, dword ptr [rbx + 44]   /* mmap_length */
        add rcx, rsi
        xor r13d, r13d                  /* usable bytes from 1 MiB up */
1:      cmp rsi, rcx
        jae 3f
        cmp dword ptr [rsi + 20], 1     /* type 1: available RAM */
        jne 2f
        cmp qword ptr [rsi + 4], 0x100000
        jb 2f
        add r13, qword ptr [rsi + 12]
2:      mov eax, dword ptr [rsi]        /* size, not counting itself */
        lea rsi, [rsi + rax + 4]
        jmp 1b
3:      mov eax, dword ptr [rbx + 8]
        shl rax, 10
        cmp r13, rax
        CHECK ae, 5, "the memory map has less RAM above 1 MiB than mem_upper"

        mov edi, FW_CFG_SIGNATURE
        mov esi, 4
        call fw_cfg_read
        cmp eax, QEMU_SIGNATURE
        CHECK e, 6, "fw_cfg signature is not QEMU"
        mov edi, FW_CFG_ID
        mov esi, 4
        call fw_cfg_read
        test eax, 1
        CHECK nz, 7, "fw_cfg ID does not have bit 0 (traditional interface)"
        PRINT " cpus="
        mov edi, FW_CFG_NB_CPUS
        mov esi, 2
        call fw_cfg_read
        mov edi, eax
        call put_hex
        PRINT " ram="
        mov edi, FW_CFG_RAM_SIZE
        mov esi, 8
        call fw_cfg_read
        mov r12, rax
        mov rdi, rax
        call put_hex
        mov edi, 10
        call putc

        /* mem_upper counts RAM from 1 MiB up to the first hole: never more than there is. */
        mov eax, dword ptr [rbx + 8]
        add rax, 1024
        shl rax, 10
        cmp r12, rax
        CHECK ae, 8, "fw_cfg RAM size is less than 1 MiB + mem_upper"

        xor eax, eax
        pop r13
        pop r12
        pop rbx
        ret
