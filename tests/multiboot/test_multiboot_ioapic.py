"""Our IOAPIC driven the way kvm-unit-tests' x86/ioapic drives it: pc-testdev lines into pins.

Each kernel checks one part of the 82093AA datasheet, section 3.2.4 (I/O Redirection
Table Registers) and KVM api.rst's KVM_EXIT_IOAPIC_EOI ("retrigger the interrupt if it
is still asserted"); the failing check names itself on COM1 and in the exit status.
"""

from __future__ import annotations

import pytest
from guests.multiboot import KernelBuilder, KernelRunner

pytestmark = pytest.mark.kvm


def test_3_2_4_edge_pin_one_interrupt_per_edge_pending_with_if_clear_lost_when_masked(
    kernels: KernelBuilder, runner: KernelRunner
) -> None:
    run = runner.run(kernels.build("ioapic_edge"))
    assert run.passed, run.describe()


def test_3_2_4_level_pin_remote_irr_tmr_redelivery_while_held_mask_and_unmask(
    kernels: KernelBuilder, runner: KernelRunner
) -> None:
    run = runner.run(kernels.build("ioapic_level"))
    assert run.passed, run.describe()


def test_a_failed_check_is_the_exit_status_and_a_line_on_com1(
    kernels: KernelBuilder, runner: KernelRunner
) -> None:
    """Without pc-testdev the lines never move: the edge kernel's first check fails (code 1)."""
    run = runner.run(
        kernels.build("ioapic_edge"), devices=["--device", "isa-debug-exit,iobase=0xf4,iosize=0x4"]
    )
    assert run.status == (1 << 1) | 1, run.describe()
    assert "FAIL: edge: no interrupt after a pulse" in run.serial
