"""The PCI bus: configuration space, MSI-X, and the host bridge with its access mechanisms."""
