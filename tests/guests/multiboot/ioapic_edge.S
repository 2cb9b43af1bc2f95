/*
 * Edge-triggered IOAPIC pin driven by pc-testdev (82093AA datasheet section
 * 3.2.4, I/O Redirection Table Registers): one interrupt per rising edge, none
 * for a held line, an edge pends in the LAPIC's IRR while IF=0, an edge on a
 * masked pin is lost, and the TMR bit of an edge vector stays clear.
 */
        .include "checks.inc"

        .set PIN, 14
        .set VECTOR, 0x40

        .text
        .globl main
main:
        SET_GATE VECTOR, edge_interrupt
        sti
        IOAPIC_ENTRY PIN, VECTOR

        call pulse
        WAIT_COUNT interrupts, 1, DELIVERY_POLLS
        test eax, eax
        CHECK nz, 1, "edge: no interrupt after a pulse"
        WAIT_COUNT interrupts, 2, QUIET_POLLS
        test eax, eax
        CHECK z, 2, "edge: two interrupts for one pulse"

        /* A line held high is one edge. */
        LINE PIN, 1
        WAIT_COUNT interrupts, 2, DELIVERY_POLLS
        test eax, eax
        CHECK nz, 3, "edge: no interrupt for a rising edge"
        WAIT_COUNT interrupts, 3, QUIET_POLLS
        test eax, eax
        CHECK z, 4, "edge: a held line interrupted again"
        LINE PIN, 0

        /* With IF=0 the edge waits in the LAPIC's IRR, then arrives once. */
        cli
        call pulse
        WAIT_COUNT interrupts, 3, QUIET_POLLS
        test eax, eax
        CHECK z, 5, "edge: interrupt taken with IF=0"
        mov edi, VECTOR
        mov esi, LAPIC_IRR
        call lapic_vector_bit
        test eax, eax
        CHECK nz, 6, "edge: the pending vector is not in the LAPIC IRR"
        sti
        WAIT_COUNT interrupts, 3, DELIVERY_POLLS
        test eax, eax
        CHECK nz, 7, "edge: the pending interrupt did not arrive after STI"

        /* An edge on a masked pin is ignored, not held pending. */
        IOAPIC_ENTRY PIN, VECTOR|RTE_MASKED
        call pulse
        IOAPIC_ENTRY PIN, VECTOR
        WAIT_COUNT interrupts, 4, QUIET_POLLS
        test eax, eax
        CHECK z, 8, "edge: an edge on a masked pin was delivered"
        call pulse
        WAIT_COUNT interrupts, 4, DELIVERY_POLLS
        test eax, eax
        CHECK nz, 9, "edge: no interrupt after unmasking"

        mov edi, VECTOR
        mov esi, LAPIC_TMR
        call lapic_vector_bit
        test eax, eax
        CHECK z, 10, "edge: TMR bit set for an edge vector"
        mov edi, PIN
        call ioapic_entry_low
        test eax, RTE_REMOTE_IRR
        CHECK z, 11, "edge: Remote IRR set on an edge pin"
        xor eax, eax
        ret

pulse:
        LINE PIN, 1
        LINE PIN, 0
        ret

        INTERRUPT_HANDLER edge_interrupt, count_and_eoi
count_and_eoi:
        lock inc dword ptr [rip + interrupts]
        jmp lapic_eoi

        .data
interrupts:
        .long 0
