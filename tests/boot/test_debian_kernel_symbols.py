"""The default guest's kernel names its own functions: kallsyms read out of the image
(kvm_vmm.kernel_symbols) agree with the symbol table the kernel exports to modules,
__ksymtab, decoded here on its own (each entry: 32-bit offsets from itself to the
symbol and to its name); only the ELF section headers are read with the same helper.
No guest is run."""

from __future__ import annotations

import struct

import pytest
from conftest import BootFiles

from kvm_vmm.kernel_symbols import elf_sections, read_kallsyms
from kvm_vmm.loaders import kernel_elf

pytestmark = [pytest.mark.kvm, pytest.mark.boot]


def _exported(elf: bytes) -> dict[str, int]:
    sections = elf_sections(elf)
    strings = sections["__ksymtab_strings"]
    exported = {}
    for table in ("__ksymtab", "__ksymtab_gpl"):
        address, offset = sections[table].address, sections[table].offset
        for entry in range(0, sections[table].size, 12):
            value_offset, name_offset, _ = struct.unpack_from("<iii", elf, offset + entry)
            name_at = address + entry + 4 + name_offset - strings.address + strings.offset
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
