"""kvm_vmm.kernel_modules: a module's .modinfo (ELF64 sections, System V ABI), the
dependency closure in load order, modules.builtin, and decompressing .ko.xz/.zst/.gz.

The module files are small ELF64 objects built here with only the sections read
(.modinfo and the section-name table), as modpost lays .modinfo out: NUL-separated
``key=value`` strings.
"""

from __future__ import annotations

import gzip
import lzma
import struct

import pytest
import zstandard

from kvm_vmm.kernel_modules import (
    GUEST_MODULES,
    SIGNATURE_MARKER,
    ModuleFormatError,
    ModuleSelectionError,
    builtin_modules,
    decompress_module,
    driver_modules,
    load_order,
    modinfo,
    module_depends,
    module_name,
    strip_signature,
)
from kvm_vmm.testing import fake_module

# The Debian 6.1 cloud kernel's virtio modules as their .modinfo says (depends=).
DEBIAN_DEPENDS: dict[str, tuple[str, ...]] = {
    "virtio_ring": (),
    "virtio": ("virtio_ring",),
    "virtio_pci_legacy_dev": (),
    "virtio_pci_modern_dev": (),
    "virtio_pci": ("virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"),
    "virtio_blk": ("virtio", "virtio_ring"),
    "virtio_rng": ("virtio", "virtio_ring"),
    "failover": (),
    "net_failover": ("failover",),
    "virtio_net": ("virtio_ring", "virtio", "net_failover"),
    "vsock": (),
    "vmw_vsock_virtio_transport_common": ("vsock",),
    "vmw_vsock_virtio_transport": (
        "virtio",
        "vmw_vsock_virtio_transport_common",
        "virtio_ring",
        "vsock",
    ),
    "ext4": ("mbcache", "jbd2", "crc16"),
    "jbd2": (),
    "mbcache": (),
    "crc16": (),
}


def test_modinfo_is_read_from_the_section_and_depends_split() -> None:
    module = fake_module("virtio_pci", "virtio_ring,virtio", extra=("license=GPL",))
    assert ("license", "GPL") in modinfo(module)
    assert ("name", "virtio_pci") in modinfo(module)
    assert module_depends(module) == ("virtio_ring", "virtio")
    assert module_depends(fake_module("virtio_ring")) == ()
    assert module_depends(fake_module("a", "hw-thing")) == ("hw_thing",)


def test_what_is_not_a_module_is_refused_with_the_reason() -> None:
    with pytest.raises(ModuleFormatError, match="not an ELF"):
        modinfo(b"MZ" + bytes(100))
    elf32 = bytearray(fake_module("x"))
    elf32[4] = 1
    with pytest.raises(ModuleFormatError, match="ELF64"):
        modinfo(bytes(elf32))
    module = fake_module("x")
    with pytest.raises(ModuleFormatError, match="past the end"):
        modinfo(module[:-10])
    renamed = module.replace(b".modinfo\0", b".modinfX\0")
    with pytest.raises(ModuleFormatError, match=r"no \.modinfo"):
        modinfo(renamed)


def test_module_names_are_the_kernels() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert module_name("virtio_blk.ko.xz") == "virtio_blk"
    assert module_name("virtio_blk.ko.zst") == "virtio_blk"
    assert module_name("kernel/fs/ext4/ext4.ko.gz") == "ext4"
    assert module_name("modules.builtin") is None
    assert module_name("virtio_blk.ko.bz2") is None


def test_the_closure_puts_each_module_after_what_it_needs_once() -> None:
    order = load_order(DEBIAN_DEPENDS, GUEST_MODULES)
    assert set(order) == {
        "virtio_ring",
        "virtio",
        "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev",
        "virtio_pci",
        "virtio_blk",
        "virtio_rng",
        "failover",
        "net_failover",
        "virtio_net",
        "vsock",
        "vmw_vsock_virtio_transport_common",
        "vmw_vsock_virtio_transport",
    }
    assert len(order) == len(set(order))
    for module in order:
        for dependency in DEBIAN_DEPENDS[module]:
            assert order.index(dependency) < order.index(module), (dependency, module)
    assert "ext4" not in order  # nothing wanted needs it
    assert order[:5] == [
        "virtio_ring",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio",
        "virtio_pci",
    ]


def test_built_in_modules_are_not_loaded_nor_looked_for() -> None:
    depends = {"ext4": ("mbcache", "jbd2", "crc16"), "jbd2": ()}
    assert load_order(depends, ["ext4"], frozenset({"mbcache", "crc16"})) == ["jbd2", "ext4"]
    assert load_order(depends, ["ext4"], frozenset({"ext4"})) == []


def test_a_module_missing_or_a_cycle_is_an_error_naming_them() -> None:
    with pytest.raises(ModuleSelectionError, match=r"virtio_ring \(needed by virtio\)"):
        load_order({"virtio": ("virtio_ring",)}, ["virtio"])
    with pytest.raises(ModuleSelectionError, match="virtio_blk is neither"):
        load_order({}, ["virtio-blk"])
    with pytest.raises(ModuleSelectionError, match="a -> b -> a"):
        load_order({"a": ("b",), "b": ("a",)}, ["a"])


def test_modules_builtin_lists_names() -> None:
    text = "kernel/fs/ext4/ext4.ko\nkernel/drivers/char/hw_random/rng-core.ko\n\n"
    assert builtin_modules(text) == frozenset({"ext4", "rng_core"})


@pytest.mark.parametrize(
    ("suffix", "compress"),
    [
        (".ko", lambda data: data),
        (".ko.xz", lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
        (".ko.zst", lambda data: zstandard.ZstdCompressor(write_content_size=False).compress(data)),
        (".ko.gz", gzip.compress),
    ],
)
def test_compressed_modules_are_decompressed_by_suffix(suffix: str, compress: object) -> None:
    module = fake_module("virtio_blk", "virtio")
    assert callable(compress)
    assert decompress_module(f"virtio_blk{suffix}", compress(module)) == module


def test_damaged_or_unknown_module_files_are_refused() -> None:
    module = fake_module("virtio_blk")
    with pytest.raises(ModuleFormatError, match=r"damaged \.xz"):
        decompress_module("virtio_blk.ko.xz", lzma.compress(module)[:-20])
    with pytest.raises(ModuleFormatError, match="not an ELF"):
        decompress_module("virtio_blk.ko.gz", gzip.compress(b"not an object"))
    with pytest.raises(ModuleFormatError, match="not a kernel module file"):
        decompress_module("virtio_blk.ko.bz2", module)


def debian_modules() -> list[tuple[str, bytes]]:
    order = load_order(DEBIAN_DEPENDS, DEBIAN_DEPENDS)
    return [(name, fake_module(name, ",".join(DEBIAN_DEPENDS[name]))) for name in order]


def test_each_virtio_device_needs_its_driver_the_transport_and_their_dependencies() -> None:
    modules = debian_modules()
    needed = driver_modules(modules)
    position = {name: index for index, (name, _) in enumerate(modules)}
    transport = {"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev"}
    assert set(needed[0x1042]) == transport | {"virtio_pci", "virtio_blk"}
    assert set(needed[0x1044]) == transport | {"virtio_pci", "virtio_rng"}
    assert set(needed[0x1041]) == transport | {
        "virtio_pci",
        "failover",
        "net_failover",
        "virtio_net",
    }
    assert "vsock" in needed[0x1053]
    for names in needed.values():
        assert [position[name] for name in names] == sorted(position[name] for name in names)
    assert (
        driver_modules([(name, elf) for name, elf in modules if name != "virtio_net"]).get(0x1041)
        is None
    )


def test_an_appended_signature_is_stripped_and_an_unsigned_module_kept() -> None:
    module = fake_module("virtio")
    signature = bytes(range(40)) + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, 40) + SIGNATURE_MARKER
    assert strip_signature(module + signature) == module
    assert strip_signature(module) == module
    with pytest.raises(ModuleFormatError, match="longer than the module"):
        strip_signature(
            b"\x7fELF" + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, 4096) + SIGNATURE_MARKER
        )
