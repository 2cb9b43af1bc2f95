"""A split-irqchip virtual machine monitor assembled from kvm-devices and kvmfast."""

__version__ = "0.1.0"
