/*
 * A kernel that never finishes: prints "spinning" on COM1, then loops at
 * spin_forever. For the run endings the guest does not choose (--timeout,
 * SIGTERM), which must say where each vCPU was.
 */
        .include "checks.inc"

        .text
        .globl main
main:
        PRINT "spinning\n"
        .globl spin_forever
spin_forever:
        pause
        jmp spin_forever
