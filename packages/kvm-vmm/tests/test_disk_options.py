"""--disk's words (Cloud Hypervisor's spelling), and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvm_vmm.disk_options import DiskSpec, DiskSpecError, parse_disk_spec


def test_path_alone_is_a_writable_buffered_disk() -> None:
    assert parse_disk_spec("path=/tmp/a.img") == DiskSpec(Path("/tmp/a.img"))


def test_a_bare_first_word_is_the_path() -> None:
    assert parse_disk_spec("/tmp/a.img,readonly=on") == DiskSpec(Path("/tmp/a.img"), readonly=True)


def test_every_option() -> None:
    spec = parse_disk_spec("path=disk.raw,readonly=on,serial=ABC-123,direct=on")
    assert spec == DiskSpec(Path("disk.raw"), readonly=True, serial="ABC-123", direct=True)


def test_switches_accept_off_and_true() -> None:
    assert parse_disk_spec("path=x,readonly=off,direct=true") == DiskSpec(Path("x"), direct=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("readonly=on", "path=FILE is missing"),
        ("path=", "path= is empty"),
        ("path=x,readonly=maybe", "is not on or off"),
        ("path=x,cache=none", "unknown option 'cache'"),
        ("path=x,readonly", "is not KEY=VALUE"),
        ("path=x,serial=" + "s" * 21, "at most 20"),
        ("path=x,serial=a\tb", "printable"),
    ],
)
def test_bad_specs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(DiskSpecError, match=message):
        parse_disk_spec(text)
