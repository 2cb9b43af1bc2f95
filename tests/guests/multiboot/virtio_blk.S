/*
 * A virtio-blk driver in a few hundred instructions, no Linux: PCI configuration
 * mechanism #1 finds the modern virtio-blk function (vendor 0x1af4, device 0x1042;
 * virtio 1.2 §4.1.2), the device is initialised as §3.1.1 says, and one split queue
 * (§2.7) carries requests (§5.2.6): a write and a read-back of sector 1, a flush, a
 * read beyond the capacity (VIRTIO_BLK_S_IOERR), GET_ID (the serial), first with an
 * MSI-X interrupt per completion (§4.1.5.1.2, PCI 3.0 §6.8.2; a masked vector holds
 * its interrupt in the PBA until it is unmasked), then, after a device
 * reset, with MSI-X off: INTx through the IOAPIC (level, active low) until the ISR
 * read (§4.1.4.5). Last a descriptor chain that loops (§2.7.5.3.1: "the driver MUST
 * NOT create a descriptor chain longer than the Queue Size") must set
 * DEVICE_NEEDS_RESET (§2.1.2), and a reset must bring the device back.
 *
 * The test passes the disk with serial=KVMTEST and checks sector 1 in the image.
 */
        .include "checks.inc"

        .set VIRTIO_VENDOR_DEVICE, 0x10421af4
        .set PCI_ADDRESS, 0xCF8
        .set PCI_DATA, 0xCFC
        .set PCI_COMMAND_MEMORY_MASTER, 0x6
        .set CAP_MSIX, 0x11
        .set MSIX_ENABLE, 1 << 15

        /* BAR0 layout of kvm-devices' transport (its capabilities say the same). */
        .set COMMON, 0x0000
        .set ISR, 0x1000
        .set DEVICE_CFG, 0x2000
        .set NOTIFY, 0x3000
        .set MSIX_TABLE, 0x4000
        .set MSIX_PBA, 0x5000

        /* struct virtio_pci_common_cfg (§4.1.4.3) */
        .set DFSELECT, 0x00
        .set DF, 0x04
        .set GFSELECT, 0x08
        .set GF, 0x0C
        .set MSIX_CONFIG, 0x10
        .set STATUS, 0x14
        .set Q_SELECT, 0x16
        .set Q_SIZE, 0x18
        .set Q_MSIX, 0x1A
        .set Q_ENABLE, 0x1C
        .set Q_NOTIFY_OFF, 0x1E
        .set Q_DESC, 0x20
        .set Q_DRIVER, 0x28
        .set Q_DEVICE, 0x30

        .set S_ACK, 1
        .set S_DRIVER, 2
        .set S_DRIVER_OK, 4
        .set S_FEATURES_OK, 8
        .set S_NEEDS_RESET, 64
        .set NO_VECTOR, 0xFFFF

        .set QSIZE, 8
        .set DESC_TABLE, 0x1000000
        .set AVAIL_RING, 0x1001000
        .set USED_RING, 0x1002000
        .set HEADER, 0x1003000
        .set DATA, 0x1004000
        .set READBACK, 0x1005000
        .set STATUS_BYTE, 0x1006000
        .set VRING_DESC_F_NEXT, 1
        .set VRING_DESC_F_WRITE, 2

        .set T_IN, 0
        .set T_OUT, 1
        .set T_FLUSH, 4
        .set T_GET_ID, 8
        .set S_OK, 0
        .set S_IOERR, 1

        .set MSI_VECTOR, 0x50
        .set INTX_VECTOR, 0x51
        .set COMPLETION_POLLS, 200000

        .text
        .globl main
main:
        SET_GATE MSI_VECTOR, msi_interrupt
        SET_GATE INTX_VECTOR, intx_interrupt
        call find_device
        test eax, eax
        CHECK nz, 1, "no virtio-blk function (1af4:1042) on bus 0"
        call map_bar0
        test eax, eax
        CHECK nz, 2, "BAR0 unassigned or above 4 GiB"

        /* -------- MSI-X: one vector for the queue */
        call init_device
        test eax, eax
        CHECK nz, 3, "FEATURES_OK refused for VERSION_1"
        mov rbx, [rip + bar0]
        mov dword ptr [rbx + MSIX_TABLE + 0], 0xFEE00000
        mov dword ptr [rbx + MSIX_TABLE + 4], 0
        mov dword ptr [rbx + MSIX_TABLE + 8], MSI_VECTOR
        mov dword ptr [rbx + MSIX_TABLE + 12], 0
        mov esi, 1
        call set_msix_enable
        test eax, eax
        CHECK nz, 4, "no MSI-X capability"
        mov word ptr [rbx + COMMON + MSIX_CONFIG], NO_VECTOR
        mov edi, 0
        call setup_queue
        cmp eax, 0
        CHECK e, 5, "queue_msix_vector did not read back vector 0"
        mov byte ptr [rbx + COMMON + STATUS], S_ACK|S_DRIVER|S_FEATURES_OK|S_DRIVER_OK
        sti
        lea rax, [rip + msi_count]
        mov [rip + counter], rax
        call io_requests
        mov eax, [rip + msi_count]
        cmp eax, 5
        CHECK e, 6, "MSI-X: not one interrupt per request"

        /* A masked vector (PCI 3.0 §6.8.2.9): the completion sets its pending bit and
           nothing is delivered; unmasking delivers it once and clears the bit. */
        mov dword ptr [rbx + MSIX_TABLE + 12], 1
        mov dword ptr [rip + wait_interrupt], 0
        mov edi, T_FLUSH
        xor esi, esi
        call request_no_data
        cmp eax, S_OK
        CHECK e, 14, "flush with the vector masked failed"
        /* The used ring is written before the interrupt is sent: wait for the bit. */
        mov ecx, COMPLETION_POLLS
16:     mov eax, [rbx + MSIX_PBA]
        test eax, 1
        jnz 17f
        call vm_exit
        dec ecx
        jnz 16b
17:     mov eax, [rbx + MSIX_PBA]
        test eax, 1
        CHECK nz, 16, "MSI-X: no pending bit for the masked vector's interrupt"
        cmp dword ptr [rip + msi_count], 5
        CHECK e, 15, "MSI-X: a masked vector was delivered"
        mov dword ptr [rbx + MSIX_TABLE + 12], 0
        WAIT_COUNT msi_count, 6, COMPLETION_POLLS
        test eax, eax
        CHECK nz, 17, "MSI-X: unmasking a pending vector delivered nothing"
        mov eax, [rbx + MSIX_PBA]
        test eax, 1
        CHECK z, 18, "MSI-X: pending bit still set after delivery"
        mov dword ptr [rip + wait_interrupt], 1

        /* -------- reset, then INTx: MSI-X off, IOAPIC pin of the slot's INTA */
        mov byte ptr [rbx + COMMON + STATUS], 0
        movzx eax, byte ptr [rbx + COMMON + STATUS]
        test eax, eax
        CHECK z, 7, "device status not 0 after reset"
        mov esi, 0
        call set_msix_enable
        call init_device
        test eax, eax
        CHECK nz, 8, "FEATURES_OK refused after reset"
        mov edi, 0
        call setup_queue
        /* PCI INTx: GSI 16 + (slot + INTA) % 8 (the _PRT's), level, active low. */
        mov edi, [rip + slot]
        and edi, 7
        add edi, 16
        IOAPIC_ENTRY edi, INTX_VECTOR|RTE_LEVEL|(1 << 13)
        mov byte ptr [rbx + COMMON + STATUS], S_ACK|S_DRIVER|S_FEATURES_OK|S_DRIVER_OK
        lea rax, [rip + intx_count]
        mov [rip + counter], rax
        call io_requests
        mov eax, [rip + intx_count]
        cmp eax, 5
        CHECK e, 9, "INTx: not one interrupt per request (stuck line or none)"
        cmp dword ptr [rip + intx_bad_isr], 0
        CHECK e, 10, "INTx: ISR bit 0 clear in the handler"

        /* -------- a chain that loops: NEEDS_RESET, and the VMM lives on */
        lea rdi, [rip + loop_chain]
        call submit_raw
        mov ecx, COMPLETION_POLLS
1:      movzx eax, byte ptr [rbx + COMMON + STATUS]
        test eax, S_NEEDS_RESET
        jnz 2f
        call vm_exit
        dec ecx
        jnz 1b
2:      movzx eax, byte ptr [rbx + COMMON + STATUS]
        test eax, S_NEEDS_RESET
        CHECK nz, 11, "a looping chain did not set DEVICE_NEEDS_RESET"
        mov byte ptr [rbx + COMMON + STATUS], 0
        call init_device
        test eax, eax
        CHECK nz, 12, "the device did not come back after NEEDS_RESET and reset"
        mov edi, 0
        call setup_queue
        mov byte ptr [rbx + COMMON + STATUS], S_ACK|S_DRIVER|S_FEATURES_OK|S_DRIVER_OK
        mov qword ptr [rip + expected_used], 0
        mov dword ptr [rip + intx_count], 0
        mov edi, T_FLUSH
        xor esi, esi
        call request_no_data
        cmp eax, S_OK
        CHECK e, 13, "flush after the reset failed"
        xor eax, eax
        ret

/* Five requests on queue 0, each waited for through [counter]. */
io_requests:
        push rbx
        mov qword ptr [rip + expected_used], 0
        /* write sector 1: bytes i*7+3 */
        lea rdi, [DATA]
        xor ecx, ecx
3:      lea eax, [rcx + rcx * 2]
        lea eax, [rax + rcx * 4 + 3]
        mov [rdi + rcx], al
        inc ecx
        cmp ecx, 512
        jne 3b
        mov edi, T_OUT
        mov esi, 1
        mov edx, DATA
        mov ecx, 0                      /* device reads the buffer */
        call request
        cmp eax, S_OK
        CHECK e, 20, "write of sector 1 failed"
        /* read it back */
        mov edi, T_IN
        mov esi, 1
        mov edx, READBACK
        mov ecx, VRING_DESC_F_WRITE
        call request
        cmp eax, S_OK
        CHECK e, 21, "read of sector 1 failed"
        lea rsi, [DATA]
        lea rdi, [READBACK]
        mov ecx, 512
        repe cmpsb
        CHECK e, 22, "sector 1 read back differs from what was written"
        /* flush */
        mov edi, T_FLUSH
        xor esi, esi
        call request_no_data
        cmp eax, S_OK
        CHECK e, 23, "flush failed"
        /* beyond the capacity */
        mov rbx, [rip + bar0]
        mov rsi, [rbx + DEVICE_CFG]     /* capacity in 512-byte sectors */
        mov edi, T_IN
        mov edx, READBACK
        mov ecx, VRING_DESC_F_WRITE
        call request
        cmp eax, S_IOERR
        CHECK e, 24, "read beyond the capacity did not give VIRTIO_BLK_S_IOERR"
        /* GET_ID: 20 bytes */
        mov edi, T_GET_ID
        xor esi, esi
        mov edx, READBACK
        mov ecx, VRING_DESC_F_WRITE
        mov r8d, 20
        call request_sized
        cmp eax, S_OK
        CHECK e, 25, "GET_ID failed"
        mov rax, 0x00545345544D564B     /* "KVMTEST\0" */
        cmp rax, [READBACK]
        CHECK e, 26, "GET_ID did not return the serial"
        pop rbx
        ret

/* eax = 1 if a function with VIRTIO_VENDOR_DEVICE is on bus 0 (slot saved). */
find_device:
        xor ecx, ecx
4:      mov eax, ecx
        shl eax, 11
        or eax, 0x80000000
        mov dx, PCI_ADDRESS
        out dx, eax
        mov dx, PCI_DATA
        in eax, dx
        cmp eax, VIRTIO_VENDOR_DEVICE
        je 5f
        inc ecx
        cmp ecx, 32
        jne 4b
        xor eax, eax
        ret
5:      mov [rip + slot], ecx
        mov eax, 1
        ret

/* eax = config dword at offset edi of the device's function. */
config_read:
        mov eax, [rip + slot]
        shl eax, 11
        or eax, edi
        or eax, 0x80000000
        mov dx, PCI_ADDRESS
        out dx, eax
        mov dx, PCI_DATA
        in eax, dx
        ret

/* config dword at offset edi = esi. */
config_write:
        mov eax, [rip + slot]
        shl eax, 11
        or eax, edi
        or eax, 0x80000000
        mov dx, PCI_ADDRESS
        out dx, eax
        mov dx, PCI_DATA
        mov eax, esi
        out dx, eax
        ret

/* Reads BAR0 (64-bit), turns on memory decode and bus mastering; eax = 1 if usable. */
map_bar0:
        mov edi, 0x14
        call config_read
        test eax, eax
        jnz 6f
        mov edi, 0x10
        call config_read
        and eax, 0xFFFFFFF0
        jz 6f
        mov [rip + bar0], rax
        mov edi, 0x04
        call config_read
        or eax, PCI_COMMAND_MEMORY_MASTER
        mov esi, eax
        mov edi, 0x04
        call config_write
        mov eax, 1
        ret
6:      xor eax, eax
        ret

/* MSI-X enable bit = esi; eax = 0 if the function has no MSI-X capability. */
set_msix_enable:
        push r12
        mov r12d, esi
        mov edi, 0x34
        call config_read
        and eax, 0xFC
7:      test eax, eax
        jz 9f
        mov edi, eax
        push rdi
        call config_read
        pop rdi
        cmp al, CAP_MSIX
        je 8f
        shr eax, 8
        and eax, 0xFC
        jmp 7b
8:      mov esi, eax
        and esi, ~(MSIX_ENABLE << 16)
        test r12d, r12d
        jz 10f
        or esi, MSIX_ENABLE << 16
10:     call config_write
        mov eax, 1
9:      pop r12
        ret

/* Reset, ACKNOWLEDGE|DRIVER, VERSION_1 only, FEATURES_OK; eax = 1 if it stuck. */
init_device:
        mov rbx, [rip + bar0]
        mov byte ptr [rbx + COMMON + STATUS], 0
        mov byte ptr [rbx + COMMON + STATUS], S_ACK
        mov byte ptr [rbx + COMMON + STATUS], S_ACK|S_DRIVER
        mov dword ptr [rbx + COMMON + DFSELECT], 1
        mov eax, [rbx + COMMON + DF]
        test eax, 1                     /* VIRTIO_F_VERSION_1 is bit 32 */
        jz 11f
        mov dword ptr [rbx + COMMON + GFSELECT], 0
        mov dword ptr [rbx + COMMON + GF], 0
        mov dword ptr [rbx + COMMON + GFSELECT], 1
        mov dword ptr [rbx + COMMON + GF], 1
        mov byte ptr [rbx + COMMON + STATUS], S_ACK|S_DRIVER|S_FEATURES_OK
        movzx eax, byte ptr [rbx + COMMON + STATUS]
        and eax, S_FEATURES_OK
        shr eax, 3
        ret
11:     xor eax, eax
        ret

/* Queue edi: QSIZE entries at the fixed rings, vector 0; eax = vector read back.
   Zeroes the rings and records the queue's notify address. */
setup_queue:
        mov rbx, [rip + bar0]
        mov [rbx + COMMON + Q_SELECT], di
        mov word ptr [rbx + COMMON + Q_SIZE], QSIZE
        mov word ptr [rbx + COMMON + Q_MSIX], 0
        mov qword ptr [rbx + COMMON + Q_DESC], DESC_TABLE
        mov qword ptr [rbx + COMMON + Q_DRIVER], AVAIL_RING
        mov qword ptr [rbx + COMMON + Q_DEVICE], USED_RING
        movzx eax, word ptr [rbx + COMMON + Q_NOTIFY_OFF]
        lea rax, [rbx + NOTIFY + rax * 4]
        mov [rip + notify], rax
        xor eax, eax
        mov ecx, 0x3000 / 8
        mov rdi, DESC_TABLE
        rep stosq
        mov qword ptr [rip + avail_idx], 0
        mov word ptr [rbx + COMMON + Q_ENABLE], 1
        movzx eax, word ptr [rbx + COMMON + Q_MSIX]
        ret

/* eax = status of a request: type edi, sector rsi, one data buffer at edx of 512 bytes,
   flags ecx for it (VRING_DESC_F_WRITE for a device-written buffer). */
request:
        mov r8d, 512
/* ... of r8d bytes. */
request_sized:
        call header_descriptor
        mov qword ptr [rax + 16], rdx
        mov dword ptr [rax + 24], r8d
        or ecx, VRING_DESC_F_NEXT
        mov word ptr [rax + 28], cx
        mov word ptr [rax + 30], 2
        mov qword ptr [rax + 32], STATUS_BYTE
        mov dword ptr [rax + 40], 1
        mov word ptr [rax + 44], VRING_DESC_F_WRITE
        mov word ptr [rax + 46], 0
        jmp submit

/* The header (type edi, sector rsi), the status byte unwritten (0xFF) and descriptor 0
   -> descriptor 1; rax = the descriptor table. */
header_descriptor:
        mov dword ptr [HEADER], edi
        mov dword ptr [HEADER + 4], 0
        mov qword ptr [HEADER + 8], rsi
        mov byte ptr [STATUS_BYTE], 0xFF
        mov rax, DESC_TABLE
        mov qword ptr [rax + 0], HEADER
        mov dword ptr [rax + 8], 16
        mov word ptr [rax + 12], VRING_DESC_F_NEXT
        mov word ptr [rax + 14], 1
        ret

/* Type edi, sector rsi, no data buffer (flush). */
request_no_data:
        call header_descriptor
        mov qword ptr [rax + 16], STATUS_BYTE
        mov dword ptr [rax + 24], 1
        mov word ptr [rax + 28], VRING_DESC_F_WRITE
        mov word ptr [rax + 30], 0
/* Publish head 0, ring the doorbell, wait for the used index and the interrupt. */
submit:
        push rbx
        movzx ecx, word ptr [rip + avail_idx]
        mov eax, ecx
        and eax, QSIZE - 1
        mov word ptr [AVAIL_RING + 4 + rax * 2], 0
        inc ecx
        mov [rip + avail_idx], cx
        mov word ptr [AVAIL_RING + 2], cx      /* a store after the entry: x86 keeps order */
        mov rax, [rip + counter]
        mov ebx, [rax]
        inc ebx
        mov rdx, [rip + notify]
        mov word ptr [rdx], 0                  /* queue 0's doorbell */
        inc qword ptr [rip + expected_used]
        mov ecx, COMPLETION_POLLS
12:     movzx eax, word ptr [USED_RING + 2]
        cmp rax, [rip + expected_used]
        jne 13f
        cmp dword ptr [rip + wait_interrupt], 0
        je 14f
        mov rax, [rip + counter]
        cmp [rax], ebx
        jae 14f
13:     call vm_exit
        dec ecx
        jnz 12b
        lea rdi, [rip + timeout_message]
        mov esi, 30
        jmp fail
14:     movzx eax, byte ptr [STATUS_BYTE]
        pop rbx
        ret

/* Publish the chain at rdi (a list of 16-byte descriptors, 3 of them) as head 0, ring. */
submit_raw:
        mov rsi, rdi
        mov rdi, DESC_TABLE
        mov ecx, 3 * 16
        rep movsb
        movzx ecx, word ptr [rip + avail_idx]
        mov eax, ecx
        and eax, QSIZE - 1
        mov word ptr [AVAIL_RING + 4 + rax * 2], 0
        inc ecx
        mov [rip + avail_idx], cx
        mov word ptr [AVAIL_RING + 2], cx
        mov rdx, [rip + notify]
        mov word ptr [rdx], 0
        ret

msi_handler:
        inc dword ptr [rip + msi_count]
        jmp lapic_eoi

intx_handler:
        mov rax, [rip + bar0]
        movzx eax, byte ptr [rax + ISR]        /* reading ISR lowers INTx */
        test eax, 1
        jnz 15f
        inc dword ptr [rip + intx_bad_isr]
15:     inc dword ptr [rip + intx_count]
        jmp lapic_eoi

        INTERRUPT_HANDLER msi_interrupt, msi_handler
        INTERRUPT_HANDLER intx_interrupt, intx_handler

        .section .rodata
timeout_message:
        .asciz "no completion (used index or interrupt) within the polls"
        .balign 16
/* header -> status -> header: a loop (next 0 from descriptor 1). */
loop_chain:
        .quad HEADER
        .long 16
        .word VRING_DESC_F_NEXT, 1
        .quad STATUS_BYTE
        .long 1
        .word VRING_DESC_F_WRITE|VRING_DESC_F_NEXT, 0
        .quad 0
        .long 0
        .word 0, 0

        .data
        .balign 8
bar0:   .quad 0
notify: .quad 0
counter: .quad 0
expected_used: .quad 0
avail_idx: .quad 0
slot:   .long 0
msi_count: .long 0
intx_count: .long 0
intx_bad_isr: .long 0
wait_interrupt: .long 1
