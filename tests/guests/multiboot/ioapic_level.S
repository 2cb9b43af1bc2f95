/*
 * Level-triggered IOAPIC pin driven by pc-testdev (82093AA datasheet section
 * 3.2.4: Remote IRR "is set to 1 after the local APIC(s) accept the level
 * interrupt sent by the IOAPIC" and reset "when an EOI message is received";
 * a masked pin sends nothing; and KVM api.rst KVM_EXIT_IOAPIC_EOI: "retrigger
 * the interrupt if it is still asserted").
 *
 * The waits make one exit per poll, so that they pass on hosts that inject
 * and report EOIs only at exits (docs/host-notes.md) as on any other.
 */
        .include "checks.inc"

        .set PIN, 14
        .set VECTOR_ONCE, 0x41
        .set VECTOR_HELD, 0x42
        .set VECTOR_MASKED, 0x43

        .text
        .globl main
main:
        SET_GATE VECTOR_ONCE, once_interrupt
        SET_GATE VECTOR_HELD, held_interrupt
        SET_GATE VECTOR_MASKED, masked_interrupt

        /* Remote IRR is set from delivery to EOI; the handler sees its TMR bit. */
        cli
        IOAPIC_ENTRY PIN, VECTOR_ONCE|RTE_LEVEL
        LINE PIN, 1
        mov edi, PIN
        call ioapic_entry_low
        test eax, RTE_REMOTE_IRR
        CHECK nz, 1, "level: Remote IRR clear while the interrupt awaits its EOI"
        sti
        WAIT_COUNT once_count, 1, DELIVERY_POLLS
        test eax, eax
        CHECK nz, 2, "level: no interrupt for an asserted line"
        mov edi, PIN
        mov esi, DELIVERY_POLLS
        call wait_remote_irr_clear
        test eax, eax
        CHECK nz, 3, "level: Remote IRR still set after the EOI"
        cmp dword ptr [rip + once_tmr], 1
        CHECK e, 4, "level: TMR bit clear for a level vector in its handler"
        WAIT_COUNT once_count, 2, QUIET_POLLS
        test eax, eax
        CHECK z, 5, "level: interrupt again after the line went low"

        /* A line still asserted at the EOI is delivered again. */
        IOAPIC_ENTRY PIN, VECTOR_HELD|RTE_LEVEL
        LINE PIN, 1
        WAIT_COUNT held_count, 2, DELIVERY_POLLS
        test eax, eax
        CHECK nz, 6, "level: no re-delivery after the EOI while the line stayed asserted"
        WAIT_COUNT held_count, 3, QUIET_POLLS
        test eax, eax
        CHECK z, 7, "level: re-delivered after the line went low"
        mov edi, PIN
        mov esi, DELIVERY_POLLS
        call wait_remote_irr_clear
        test eax, eax
        CHECK nz, 8, "level: Remote IRR still set after the last EOI"

        /* A masked pin delivers nothing and keeps Remote IRR clear; unmasking delivers. */
        IOAPIC_ENTRY PIN, VECTOR_MASKED|RTE_LEVEL|RTE_MASKED
        LINE PIN, 1
        WAIT_COUNT masked_count, 1, QUIET_POLLS
        test eax, eax
        CHECK z, 9, "level: a masked pin was delivered"
        mov edi, PIN
        call ioapic_entry_low
        test eax, RTE_REMOTE_IRR
        CHECK z, 10, "level: Remote IRR set on a masked pin"
        IOAPIC_ENTRY PIN, VECTOR_MASKED|RTE_LEVEL
        WAIT_COUNT masked_count, 1, DELIVERY_POLLS
        test eax, eax
        CHECK nz, 11, "level: unmasking an asserted pin delivered nothing"
        mov edi, PIN
        mov esi, DELIVERY_POLLS
        call wait_remote_irr_clear
        test eax, eax
        CHECK nz, 12, "level: Remote IRR still set after the unmasked interrupt's EOI"

        xor eax, eax
        ret

/* Records the TMR bit, drops the line (the device is quiet), EOIs. */
        INTERRUPT_HANDLER once_interrupt, once_service
once_service:
        mov edi, VECTOR_ONCE
        mov esi, LAPIC_TMR
        call lapic_vector_bit
        mov dword ptr [rip + once_tmr], eax
        LINE PIN, 0
        lock inc dword ptr [rip + once_count]
        jmp lapic_eoi

/* Keeps the line asserted the first time, drops it the second. */
        INTERRUPT_HANDLER held_interrupt, held_service
held_service:
        lock inc dword ptr [rip + held_count]
        cmp dword ptr [rip + held_count], 2
        jb 1f
        LINE PIN, 0
1:      jmp lapic_eoi

        INTERRUPT_HANDLER masked_interrupt, masked_service
masked_service:
        LINE PIN, 0
        lock inc dword ptr [rip + masked_count]
        jmp lapic_eoi

        .data
once_count:
        .long 0
once_tmr:
        .long -1
held_count:
        .long 0
masked_count:
        .long 0
