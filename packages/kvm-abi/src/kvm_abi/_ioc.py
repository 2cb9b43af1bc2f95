"""The ioctl request encoding of <asm-generic/ioctl.h>, which x86 uses unchanged.

A request packs (direction, type, number, argument size) into 32 bits. The kernel's
macros take a C type and apply sizeof(); these take the size in bytes, so callers
write ``_IOW(KVMIO, 0x46, sizeof(kvm_userspace_memory_region))``.
"""

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRMASK = (1 << _IOC_NRBITS) - 1
_IOC_TYPEMASK = (1 << _IOC_TYPEBITS) - 1
_IOC_SIZEMASK = (1 << _IOC_SIZEBITS) - 1
_IOC_DIRMASK = (1 << _IOC_DIRBITS) - 1

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type: int, nr: int, size: int) -> int:
    # The C macro silently overflows into neighbouring fields; a request built from a
    # wrong size must fail here instead of naming some other ioctl.
    for field, value, mask in (
        ("direction", direction, _IOC_DIRMASK),
        ("type", type, _IOC_TYPEMASK),
        ("nr", nr, _IOC_NRMASK),
        ("size", size, _IOC_SIZEMASK),
    ):
        if not 0 <= value <= mask:
            raise ValueError(f"ioctl {field} {value:#x} does not fit in {mask.bit_length()} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type, nr, 0)


def _IOR(type: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, type, nr, size)


def _IOW(type: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, type, nr, size)


def _IOWR(type: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type, nr, size)


def _IOC_DIR(request: int) -> int:
    return (request >> _IOC_DIRSHIFT) & _IOC_DIRMASK


def _IOC_TYPE(request: int) -> int:
    return (request >> _IOC_TYPESHIFT) & _IOC_TYPEMASK


def _IOC_NR(request: int) -> int:
    return (request >> _IOC_NRSHIFT) & _IOC_NRMASK


def _IOC_SIZE(request: int) -> int:
    return (request >> _IOC_SIZESHIFT) & _IOC_SIZEMASK
