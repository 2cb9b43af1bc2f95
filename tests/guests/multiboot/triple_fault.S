/*
 * A kernel that crashes the machine: prints "faulting" on COM1, loads an IDT
 * with limit 0 and executes UD2. The #UD cannot be delivered (its gate lies
 * beyond the IDT limit: #GP), nor the #GP, so the processor escalates to #DF
 * and then shuts down: a triple fault (Intel SDM Vol. 3A, 6.15, "Interrupt 8 -
 * Double Fault Exception", Table 6-5), which KVM reports as KVM_EXIT_SHUTDOWN.
 */
        .include "checks.inc"

        .text
        .globl main
main:
        PRINT "faulting\n"
        lidt [rip + empty_idt]
        ud2

        .data
empty_idt:
        .word 0
        .quad 0
