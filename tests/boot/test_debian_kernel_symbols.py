"""The default guest's kernel names its own functions: kallsyms read out of the image
(kvm_vmm.kernel_symbols) agree with the symbol table the kernel exports to modules,
__ksymtab, which is read independently (each entry: 32-bit offsets from itself to the
symbol and to its name). No guest is run."""

from __future__ import annotations

import struct

import pytest
from conftest import BootFiles

from kvm_vmm.kernel_symbols import read_kallsyms
from kvm_vmm.loaders import kernel_elf

pytestmark = [pytest.mark.kvm, pytest.mark.boot]


def _sections(elf: bytes) -> dict[str, tuple[int, int, int]]:
    """name -> (address, file offset, size)"""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    raw = [struct.unpack_from("<IIQQQQ", elf, shoff + i * entsize) for i in range(count)]
    strings = raw[names_index][4]
    return {
        elf[strings + name : elf.index(b"\0", strings + name)].decode(): (address, offset, size)
        for name, _, _, address, offset, size in raw
    }


def _exported(elf: bytes) -> dict[str, int]:
    sections = _sections(elf)
    strings_address, strings_offset, _ = sections["__ksymtab_strings"]
    exported = {}
    for table in ("__ksymtab", "__ksymtab_gpl"):
        address, offset, size = sections[table]
        for entry in range(0, size, 12):
            value_offset, name_offset, _ = struct.unpack_from("<iii", elf, offset + entry)
            name_at = address + entry + 4 + name_offset - strings_address + strings_offset
            name = elf[name_at : elf.index(b"\0", name_at)].decode()
            exported[name] = (address + entry + value_offset) % (1 << 64)
    return exported


def test_kallsyms_from_the_image_agree_with_its_exported_symbols(boot_files: BootFiles) -> None:
    elf = kernel_elf(boot_files.kernel.read_bytes(), 1 << 30)
    symbols = read_kallsyms(elf)
    by_name: dict[str, set[int]] = {}
    for symbol in symbols:
        by_name.setdefault(symbol.name, set()).add(symbol.address)
    exported = _exported(elf)
    assert len(exported) > 1000 and len(symbols) > 5 * len(exported)
    wrong = {
        name: hex(address)
        for name, address in exported.items()
        if address not in by_name.get(name, set())
    }
    assert wrong == {}
    assert by_name["start_kernel"] and by_name["entry_SYSCALL_64"]
