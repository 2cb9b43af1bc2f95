"""The virtio-pci modern transport (virtio 1.2 §4.1, no legacy interface)."""
