/*
 * Two or more vCPUs: the APs come up by the guest's own INIT, SIPI, SIPI
 * (Intel SDM Vol. 3A 8.4.4, MP initialization), and IOAPIC pins reach them by
 * physical and logical destination (82093AA datasheet section 3.2.4,
 * Destination Field and Destination Mode; Intel SDM Vol. 3A 10.6.2.2, flat
 * logical mode). Prints "cpus online: <hex>".
 */
        .include "checks.inc"

        .set FW_CFG_NB_CPUS, 0x05
        .set LEVEL_PIN, 14
        .set EDGE_PIN, 15
        .set VECTOR_PHYSICAL, 0x50
        .set VECTOR_LOGICAL, 0x51
        .set AP_APIC_ID, 1
        .set MAX_SMP_CPUS, 8

        .text
        .globl main
main:
        push rbx
        SET_GATE VECTOR_PHYSICAL, physical_interrupt
        SET_GATE VECTOR_LOGICAL, logical_interrupt
        call use_flat_logical_id

        mov edi, FW_CFG_NB_CPUS
        mov esi, 2
        call fw_cfg_read
        mov ebx, eax
        cmp ebx, 2
        CHECK ae, 1, "smp: fw_cfg reports fewer than 2 CPUs"
        cmp ebx, MAX_SMP_CPUS
        CHECK be, 2, "smp: more CPUs than this test keeps counters for"
        lea edi, [ebx - 1]
        call start_aps
        test eax, eax
        CHECK nz, 3, "smp: not every AP came online after INIT, SIPI, SIPI"
        PRINT "cpus online: "
        mov edi, dword ptr [rip + aps_online]
        inc edi
        call put_hex
        mov edi, 10
        call putc
        lea rdx, [rip + ap_seen]
        mov ecx, 1
1:      cmp byte ptr [rdx + rcx], 1
        CHECK e, 4, "smp: an APIC ID from 1 to NB_CPUS - 1 did not come online"
        inc ecx
        cmp ecx, ebx
        jb 1b
        sti

        /* Physical destination: a level interrupt for APIC ID 1 only. */
        IOAPIC_ENTRY LEVEL_PIN, VECTOR_PHYSICAL|RTE_LEVEL, AP_APIC_ID<<24
        LINE LEVEL_PIN, 1
        WAIT_COUNT physical_counts+4*AP_APIC_ID, 1, DELIVERY_POLLS
        test eax, eax
        CHECK nz, 5, "smp: a level interrupt for APIC ID 1 did not reach it"
        mov edi, LEVEL_PIN
        mov esi, DELIVERY_POLLS
        call wait_remote_irr_clear
        test eax, eax
        CHECK nz, 6, "smp: Remote IRR not cleared by the AP's EOI"
        cmp dword ptr [rip + physical_counts], 0
        CHECK e, 7, "smp: the BSP took an interrupt sent to APIC ID 1"

        /* Flat logical destination 0x3: both CPUs 0 and 1, once each. */
        IOAPIC_ENTRY EDGE_PIN, VECTOR_LOGICAL|RTE_DEST_LOGICAL, 0x03<<24
        call pulse_edge_pin
        WAIT_COUNT logical_counts+4*AP_APIC_ID, 1, DELIVERY_POLLS
        test eax, eax
        CHECK nz, 8, "smp: logical destination 0x3 did not reach CPU 1"
        WAIT_COUNT logical_counts, 1, DELIVERY_POLLS
        test eax, eax
        CHECK nz, 9, "smp: logical destination 0x3 did not reach CPU 0"

        /* Logical destination 0x2: CPU 1 only. */
        IOAPIC_ENTRY EDGE_PIN, VECTOR_LOGICAL|RTE_DEST_LOGICAL, 0x02<<24
        call pulse_edge_pin
        WAIT_COUNT logical_counts+4*AP_APIC_ID, 2, DELIVERY_POLLS
        test eax, eax
        CHECK nz, 10, "smp: logical destination 0x2 did not reach CPU 1"
        WAIT_COUNT logical_counts, 2, QUIET_POLLS
        test eax, eax
        CHECK z, 11, "smp: logical destination 0x2 reached CPU 0"

        xor eax, eax
        pop rbx
        ret

pulse_edge_pin:
        LINE EDGE_PIN, 1
        LINE EDGE_PIN, 0
        ret

/* Flat model, logical ID bit n for APIC ID n (n < 8). */
use_flat_logical_id:
        mov edi, LAPIC_DFR
        mov esi, 0xFFFFFFFF
        call lapic_write
        call lapic_id
        lea ecx, [eax + 24]
        mov esi, 1
        shl esi, cl
        mov edi, LAPIC_LDR
        jmp lapic_write

        .globl ap_main
ap_main:
        call lapic_id
        lea rdx, [rip + ap_seen]
        mov byte ptr [rdx + rax], 1
        jmp use_flat_logical_id

        INTERRUPT_HANDLER physical_interrupt, physical_service
physical_service:
        LINE LEVEL_PIN, 0
        call lapic_id
        lea rdx, [rip + physical_counts]
        lock inc dword ptr [rdx + rax * 4]
        jmp lapic_eoi

        INTERRUPT_HANDLER logical_interrupt, logical_service
logical_service:
        call lapic_id
        lea rdx, [rip + logical_counts]
        lock inc dword ptr [rdx + rax * 4]
        jmp lapic_eoi

        .data
ap_seen:
        .skip MAX_SMP_CPUS
        .balign 4
physical_counts:
        .skip 4 * MAX_SMP_CPUS
logical_counts:
        .skip 4 * MAX_SMP_CPUS
