/*
 * Finds the RSDP the way a Multiboot kernel without firmware calls does (ACPI 6.5
 * section 5.2.5.1: the "RSD PTR " signature on a 16-byte boundary of
 * 0xE0000-0xFFFFF, the first 20 bytes summing to zero) and prints
 *   rsdp=<hex> rsdt=<hex>
 * for the host test to compare with where the kernel itself lies. Also checks
 * that the RSDT the RSDP names carries its signature.
 */
        .include "checks.inc"

        .set SCAN_START, 0xE0000
        .set SCAN_END, 0x100000
        .set SIGNATURE_LOW, 0x20445352  /* "RSD " */
        .set SIGNATURE_HIGH, 0x20525450 /* "PTR " (two halves: no whole copy in this code) */
        .set RSDT_SIGNATURE, 0x54445352 /* "RSDT" */

        .text
        .globl main
main:
        push rbx
        mov ebx, SCAN_START
1:      cmp ebx, SCAN_END
        jae 4f
        cmp dword ptr [rbx], SIGNATURE_LOW
        jne 3f
        cmp dword ptr [rbx + 4], SIGNATURE_HIGH
        jne 3f
        xor eax, eax
        xor ecx, ecx
2:      add al, byte ptr [rbx + rcx]
        inc ecx
        cmp ecx, 20
        jb 2b
        test al, al
        jz 5f
3:      add ebx, 16
        jmp 1b
4:      lea rdi, [rip + no_rsdp]
        mov esi, 1
        jmp fail
5:      PRINT "rsdp="
        mov edi, ebx
        call put_hex
        PRINT " rsdt="
        mov edi, dword ptr [rbx + 16]
        call put_hex
        mov edi, 10
        call putc
        mov eax, dword ptr [rbx + 16]
        cmp dword ptr [rax], RSDT_SIGNATURE
        CHECK e, 2, "the RSDP's RsdtAddress does not point at an RSDT"
        xor eax, eax
        pop rbx
        ret

        .section .rodata
no_rsdp:
        .asciz "no RSDP with a valid checksum in 0xE0000-0xFFFFF"
