/*
 * QEMU's pci-testdev as kvm-unit-tests finds and drives it (lib/pci.c pci_find_dev
 * and the BARs firmware assigned; lib/pci-testdev.c pci_testdev_one): on bus 0
 * through configuration mechanism #1 (PCI Local Bus Specification 3.0 section
 * 3.2.2.3.2), vendor 0x1B36 and device 0x0005 read as words the way
 * pci_config_readw does, memory and I/O decode on, BAR0 memory, BAR1 I/O.
 * On each BAR tests 0-2 are run: select, count 0, 16 writes of `data` at
 * `offset`, count 16 (no ioeventfd takes them); test 3 selects none (width 0).
 */
        .include "checks.inc"

        .set CONFIG_ADDRESS, 0xCF8
        .set CONFIG_DATA, 0xCFC
        .set TESTDEV_ID, 0x00051B36
        .set WRITES, 16

        .text
        .globl main
main:
        push rbx
        push r12
        push r13
        xor ebx, ebx
1:      mov edi, ebx
        xor esi, esi
        call config_read_word
        cmp eax, TESTDEV_ID & 0xFFFF
        jne 4f
        mov edi, ebx
        mov esi, 2
        call config_read_word
        cmp eax, TESTDEV_ID >> 16
        je 2f
4:      inc ebx
        cmp ebx, 32
        jb 1b
2:      cmp ebx, 32
        CHECK b, 1, "no pci-testdev on bus 0"
        mov edi, ebx
        mov esi, 0x04
        call config_read
        and eax, 3
        cmp eax, 3
        CHECK e, 2, "pci-testdev: memory or I/O decode off"
        mov edi, ebx
        mov esi, 0x10
        call config_read
        test eax, 1
        CHECK z, 3, "pci-testdev: BAR0 is not memory"
        and eax, 0xFFFFFFF0
        CHECK nz, 4, "pci-testdev: BAR0 has no address"
        mov r12d, eax
        mov edi, ebx
        mov esi, 0x14
        call config_read
        test eax, 1
        CHECK nz, 5, "pci-testdev: BAR1 is not I/O"
        and eax, 0xFFFC
        CHECK nz, 6, "pci-testdev: BAR1 has no port"
        mov r13d, eax

        xor ebx, ebx
3:      mov edi, ebx
        call mem_test
        cmp eax, WRITES
        CHECK e, 7, "pci-testdev: a memory BAR test did not count 16 writes"
        mov edi, ebx
        call io_test
        cmp eax, WRITES
        CHECK e, 8, "pci-testdev: an I/O BAR test did not count 16 writes"
        inc ebx
        cmp ebx, 3
        jb 3b
        mov byte ptr [r12], 3
        cmp byte ptr [r12 + 1], 0
        CHECK e, 9, "pci-testdev: test 3 exists"
        PRINT "pci-testdev: 6 tests\n"
        pop r13
        pop r12
        pop rbx
        xor eax, eax
        ret

/* eax = dword at register esi of bus 0 slot edi, function 0. */
config_read:
        mov eax, edi
        shl eax, 11
        or eax, esi
        or eax, 0x80000000
        mov edx, CONFIG_ADDRESS
        out dx, eax
        mov edx, CONFIG_DATA
        in eax, dx
        ret

/* eax = the word at register esi of bus 0 slot edi, as kvm-unit-tests reads it
 * (lib/x86/asm/pci.h): the register, even unaligned, in CONFIG_ADDRESS, then a word
 * at 0xCFC, which QEMU's host bridge reads at CONFIG_ADDRESS[7:0]. */
config_read_word:
        mov eax, edi
        shl eax, 11
        or eax, esi
        or eax, 0x80000000
        mov edx, CONFIG_ADDRESS
        out dx, eax
        mov edx, CONFIG_DATA
        in ax, dx
        movzx eax, ax
        ret

/* Test edi through BAR0 at r12: eax = its count after the writes, -1 if not 0 first. */
mem_test:
        mov byte ptr [r12], dil
        mov eax, -1
        cmp dword ptr [r12 + 12], 0
        jne 2f
        mov edx, dword ptr [r12 + 4]
        movzx esi, byte ptr [r12 + 8]
        mov ecx, WRITES
1:      mov byte ptr [r12 + rdx], sil
        loop 1b
        mov eax, dword ptr [r12 + 12]
2:      ret

/* The same through BAR1's ports at r13. */
io_test:
        mov edx, r13d
        mov eax, edi
        out dx, al
        add edx, 12
        in eax, dx
        test eax, eax
        mov eax, -1
        jnz 2f
        lea edx, [r13 + 8]
        in al, dx
        movzx esi, al
        lea edx, [r13 + 4]
        in eax, dx
        lea edx, [r13 + rax]
        mov eax, esi
        mov ecx, WRITES
1:      out dx, al
        loop 1b
        lea edx, [r13 + 12]
        in eax, dx
2:      ret
