"""Pure-Python device models of the PC platform for a split-irqchip VMM."""
