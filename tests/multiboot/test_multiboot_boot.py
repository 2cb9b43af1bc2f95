"""A Multiboot kernel of our own booted by ``kvm-vmm run``: machine state, boot information, fw_cfg.

Multiboot Specification 0.6.96: section 3.1.3 (the a.out-kludge address fields) and
ELF loading, section 3.2 (machine state: EAX magic, EBX, protected mode, paging and
interrupts off; checked by boot.S before anything else), section 3.3 (mem_lower,
mem_upper, cmdline, mmap). QEMU docs/specs/fw_cfg.rst for the signature, ID,
NB_CPUS and RAM_SIZE items a kvm-unit-tests kernel reads.
"""

from __future__ import annotations

import re

import pytest
from guests.multiboot import ImageLayout, KernelBuilder, KernelRunner

pytestmark = pytest.mark.kvm

MIB = 1 << 20


@pytest.mark.parametrize("layout", ["elf32", "aout"])
def test_3_2_machine_state_and_3_3_boot_information_reach_the_kernel(
    kernels: KernelBuilder, runner: KernelRunner, layout: ImageLayout
) -> None:
    kernel = kernels.build("boot_info", layout)
    run = runner.run(kernel, "--memory", "96M", "--cpus", "2", "--cmdline", "hello=world x")
    assert run.passed, run.describe()
    printed = re.search(r"mem_upper=(\S+) cmdline=(.*) cpus=(\S+) ram=(\S+)", run.serial)
    assert printed is not None, run.describe()
    mem_upper, cmdline, cpus, ram = printed.groups()
    assert int(mem_upper, 16) == (96 * MIB - MIB) // 1024
    # GRUB and QEMU give a Multiboot kernel its path as the first word (kvm-unit-tests' argv[0]).
    assert cmdline == f"{kernel} hello=world x"
    assert int(cpus, 16) == 2
    assert int(ram, 16) == 96 * MIB


def test_without_cmdline_the_kernel_still_gets_its_path(
    kernels: KernelBuilder, runner: KernelRunner
) -> None:
    kernel = kernels.build("boot_info")
    run = runner.run(kernel)
    assert run.passed, run.describe()
    # QEMU's "%s %s": path, a space, the empty --cmdline; then the kernel's own " cpus=".
    assert f"cmdline={kernel}  cpus=0x1 " in run.serial
