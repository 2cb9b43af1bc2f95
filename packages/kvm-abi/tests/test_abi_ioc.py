"""The ioctl encoding of include/uapi/asm-generic/ioctl.h, which x86 uses unchanged."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvm_abi import (
    _IO,
    _IOC,
    _IOC_DIR,
    _IOC_NR,
    _IOC_READ,
    _IOC_SIZE,
    _IOC_TYPE,
    _IOC_WRITE,
    _IOR,
    _IOW,
    _IOWR,
    KVMIO,
)


@given(
    direction=st.integers(0, 3),
    ioc_type=st.integers(0, 0xFF),
    nr=st.integers(0, 0xFF),
    size=st.integers(0, 0x3FFF),
)
def test_ioc_fields_decode_to_what_was_encoded(
    direction: int, ioc_type: int, nr: int, size: int
) -> None:
    request = _IOC(direction, ioc_type, nr, size)
    assert request < 1 << 32
    assert (_IOC_DIR(request), _IOC_TYPE(request), _IOC_NR(request), _IOC_SIZE(request)) == (
        direction,
        ioc_type,
        nr,
        size,
    )


def test_ioc_layout_is_nr_type_size_dir_from_bit_0() -> None:
    """asm-generic/ioctl.h: nr bits 0-7, type 8-15, size 16-29, direction 30-31."""
    assert _IOC(0, 0, 1, 0) == 1 << 0
    assert _IOC(0, 1, 0, 0) == 1 << 8
    assert _IOC(0, 0, 0, 1) == 1 << 16
    assert _IOC(1, 0, 0, 0) == 1 << 30


def test_io_macros_set_direction_and_size() -> None:
    assert _IOC_DIR(_IO(KVMIO, 0x80)) == 0
    assert _IOC_SIZE(_IO(KVMIO, 0x80)) == 0
    assert _IOC_DIR(_IOR(KVMIO, 0x81, 144)) == _IOC_READ
    assert _IOC_DIR(_IOW(KVMIO, 0x82, 144)) == _IOC_WRITE
    assert _IOC_DIR(_IOWR(KVMIO, 0x05, 8)) == _IOC_READ | _IOC_WRITE
    assert _IOC_SIZE(_IOWR(KVMIO, 0x05, 8)) == 8


@pytest.mark.parametrize(
    ("direction", "ioc_type", "nr", "size"),
    [(4, 0, 0, 0), (0, 0x100, 0, 0), (0, 0, 0x100, 0), (0, 0, 0, 0x4000), (0, 0, -1, 0)],
)
def test_ioc_refuses_fields_that_overflow(
    direction: int, ioc_type: int, nr: int, size: int
) -> None:
    """The C macros would spill into the next field; a wrong request must not be built."""
    with pytest.raises(ValueError):
        _IOC(direction, ioc_type, nr, size)
