"""Error contracts of KVM ioctls, as Documentation/virt/kvm/api.rst states them.

Keyed by errno (positive, as ``OSError.errno`` carries it); the text is api.rst's own
wording, so a caller can turn a failed ioctl into the documented reason.
"""

import errno as _errno
from collections.abc import Mapping as _Mapping
from types import MappingProxyType as _MappingProxyType

# api.rst section 4.16 KVM_INTERRUPT, "X86: Returns:". On x86 the kernel checks the
# vector (EINVAL) before the in-kernel PIC (ENXIO) and that before a queued one (EEXIST).
KVM_INTERRUPT_ERRORS: _Mapping[int, str] = _MappingProxyType(
    {
        _errno.EEXIST: "if an interrupt is already enqueued",
        _errno.EINVAL: "the irq number is invalid",
        _errno.ENXIO: "if the PIC is in the kernel",
        _errno.EFAULT: "if the pointer is invalid",
    }
)
