"""examples/script_a_guest.py as a reader runs it: the default guest (Debian's cloud
kernel, the demo's busybox shell as /init) boots to the shell's prompt, the script
types a command and reads its answer off the console, and `exit` at the shell
powers the guest off (the script then exits 0). Given an ext4 image, the demo's
/init finds it as /dev/vda (virtio-blk on PCI) and mounts it at /mnt, and
virtio-rng is the guest's hw_random source; the script then snapshots the guest
and restores it into a new machine, which answers at once (issue 17's Linux check
with a virtio disk). The kvm-vmm command's own paths
(stdin to the guest, Ctrl-A x) are tested in packages/kvm-vmm/tests/test_cli.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BootFiles, boot_timeout
from virtio_guest import make_ext4_image, read_from_image

pytestmark = [pytest.mark.kvm, pytest.mark.boot]

COMMAND_SECONDS = 30.0  # a command answers in seconds; a boot would take minutes
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "script_a_guest.py"


@pytest.mark.usefixtures("boots_to_init")
def test_the_example_scripts_the_default_guest_and_powers_it_off(
    boot_files: BootFiles,  # the default guest's assets, fetched once for all boot tests
    tmp_path: Path,
) -> None:
    if os.environ.get("KVM_VMM_TEST_KERNEL"):
        pytest.skip("the example boots the default guest's own kernel, not $KVM_VMM_TEST_KERNEL")
    image = tmp_path / "disk.img"
    greeting = f"from-the-host-{os.getpid()}"
    make_ext4_image(image, {"hello.txt": greeting.encode()})
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), str(image)],
        capture_output=True,
        text=True,
        timeout=boot_timeout() + 600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (result.stdout, result.stderr[-3000:])
    answer = re.search(r"^6\*7 = 42 on 1 CPU\(s\), Linux (\S+)$", result.stdout, re.MULTILINE)
    assert answer is not None, result.stdout
    assert boot_files.kernel.name == f"vmlinuz-{answer.group(1)}"  # the guest's uname -r
    # hw_random names the device it reads: virtio_rng.<index>
    entropy = rf"^/mnt/hello.txt says {greeting}; entropy from virtio_rng\.\d+$"
    assert re.search(entropy, result.stdout, re.MULTILINE), result.stdout
    # Restored from its snapshot into a new machine: the page cache kept the note written
    # just before it, the clock continued (not back to 0, not before the snapshot), and
    # the local APIC timer kept firing.
    restored = re.search(
        r"^restored: /mnt/note.txt says written-before-the-snapshot; answered ([\d.]+) s after"
        r" restore\(\)\nits clock: (\d+) -> (\d+) s; its timer ticks: (\d+) -> (\d+)$",
        result.stdout,
        re.MULTILINE,
    )
    assert restored is not None, result.stdout
    answered, before, after, ticks_before, ticks_after = map(float, restored.groups())
    assert before <= after <= before + answered + 60, result.stdout
    assert ticks_after > ticks_before, result.stdout
    assert answered < COMMAND_SECONDS, result.stdout  # a boot takes minutes here
    note = read_from_image(image, "/note.txt")
    assert note == b"written-before-the-snapshot\n"  # synced to the image before the snapshot
    assert result.stdout.endswith("outcome: guest powered off (status 0)\n"), result.stdout
