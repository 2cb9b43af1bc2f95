"""--profile's summary: samples grouped by function, most first, shares of the total."""

from __future__ import annotations

import pytest

from kvm_vmm.profiler import GuestProfiler, function_of, summarize

SYMBOLS = {0x1000: "clear_page_erms", 0x2000: "kallsyms_lookup"}


def describe(rip: int) -> str | None:
    base = rip & ~0xFFF
    name = SYMBOLS.get(base)
    return None if name is None else f"{name}+{rip - base:#x}/0x1000"


def test_samples_are_grouped_by_function_most_first() -> None:
    samples = {0x1007: 5, 0x1010: 3, 0x2040: 10, 0x9999: 2}
    lines = summarize(samples, describe)
    assert [(line.where, line.samples) for line in lines] == [
        ("kallsyms_lookup", 10),
        ("clear_page_erms", 8),
        ("0x9999", 2),
    ]
    assert [line.share for line in lines] == pytest.approx([0.5, 0.4, 0.1])


def test_top_limits_the_lines() -> None:
    assert len(summarize({0x1000: 1, 0x2000: 2, 0x3000: 3}, describe, top=2)) == 2


def test_function_of_strips_offset_and_size() -> None:
    assert function_of("do_one_initcall+0x4c/0x1f0") == "do_one_initcall"
    assert function_of(None) is None


def test_rates_outside_the_range_are_refused() -> None:
    with pytest.raises(ValueError, match="between 0 and"):
        GuestProfiler([], hz=0)
