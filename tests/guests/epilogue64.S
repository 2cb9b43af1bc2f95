/* Tables every test guest has: the IDT (gates set at run time). */
        .data
        .balign 16
idt:
        .fill 512, 8, 0
idt_descriptor:
        .word 256 * 16 - 1
        .quad idt
