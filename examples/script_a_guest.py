"""Script a Linux guest through its serial console with the kvm_vmm library.

Boots the default guest (Debian's cloud kernel with a busybox shell as /init,
fetched with apt-get the first time and cached), waits for the shell's prompt,
runs one command, reads its answer off the console, then leaves the shell: the
guest's /init powers it off (ACPI S5) once the shell exits.

Given an ext4 image, the guest gets it as a virtio-blk disk (its /init mounts it at
/mnt) and a virtio-rng; the script reads /mnt/hello.txt, names the guest's entropy
source and writes /mnt/note.txt. Then it pauses the guest, snapshots it, closes the
machine, restores the snapshot into a new one and asks that guest for the note and
its clock: the restored guest answers at once, where a boot takes minutes.

    python examples/script_a_guest.py [EXT4_IMAGE]

Where the host's KVM emulates guest kernel code (see `kvm-vmm host-check`) the
boot takes minutes. Exit status 0 once the guest has powered off.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

from kvm_vmm import ConsoleTimeout, Machine, MachineConfig, default_guest

BOOT_SECONDS = 1200.0  # to the shell's prompt: minutes where guest kernel code is emulated
COMMAND_SECONDS = 120.0  # a fork+exec costs ~0.6 s there: a command line takes seconds
PROMPT = b"/ # "  # busybox sh's prompt for root in /
COMMAND = b"echo answer=$((6*7)) cpus=$(nproc) kernel=$(uname -r)\n"
# The shell echoes the typed line too ("answer=$((6*7)) ..."): only its output
# has digits right after "answer=". Each pattern ends at the line's end: the
# console is matched as its bytes arrive, and an open-ended \S+ would match the
# first few characters of a word the UART has not finished sending.
ANSWER = re.compile(rb"answer=(\d+) cpus=(\d+) kernel=(\S+)\r?\n")
DISK_COMMAND = (
    b"echo hello=$(cat /mnt/hello.txt) rng=$(cat /sys/class/misc/hw_random/rng_current)"
    b"; echo written-before-the-snapshot > /mnt/note.txt; sync\n"
)
DISK_ANSWER = re.compile(rb"hello=([^ ]+) rng=(\S+)\r?\n")
# The guest's clock in seconds and its local APIC timer interrupts so far (the LOC line
# of /proc/interrupts: it counts on while the guest runs).
CLOCK_COMMAND = (
    b"echo note=$(cat /mnt/note.txt) date=$(date +%s) ticks=$(grep LOC: /proc/interrupts)\n"
)
CLOCK_ANSWER = re.compile(rb"note=(\S+) date=(\d+) ticks=LOC: (\d+)[^\r\n]*\r?\n")


def ask(machine: Machine, command: bytes, answer: re.Pattern[bytes]) -> list[str]:
    machine.serial.write(command)  # typed on the guest's 16550A
    found = machine.serial.expect(answer, timeout=COMMAND_SECONDS)
    return [group.decode() for group in found.groups()]


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="script-a-guest-") as directory:
        return script(Path(argv[0]) if argv else None, Path(directory) / "snapshot")


def script(disk: Path | None, snapshot: Path) -> int:
    guest = default_guest()  # a LinuxBoot: kernel, initramfs, command line, fast boot on
    with Machine(MachineConfig(memory_size=512 << 20, cpus=1)) as machine:
        if disk is not None:
            machine.add_disk(disk)  # /dev/vda: virtio-blk on PCI
            machine.add_rng()  # /dev/hwrng: virtio-rng
        machine.boot(guest)
        machine.start()  # returns at once: the vCPUs run on their own threads
        try:
            machine.serial.expect(PROMPT, timeout=BOOT_SECONDS)
            product, cpus, kernel = ask(machine, COMMAND, ANSWER)
            print(f"6*7 = {product} on {cpus} CPU(s), Linux {kernel}")
            if disk is None:
                return power_off(machine)
            hello, rng = ask(machine, DISK_COMMAND, DISK_ANSWER)
            print(f"/mnt/hello.txt says {hello}; entropy from {rng}")
            _, before, ticks_before = ask(machine, CLOCK_COMMAND, CLOCK_ANSWER)
        except ConsoleTimeout as error:  # its message ends with the console's last bytes
            print(f"script_a_guest: {error}", file=sys.stderr)
            return 1
        machine.pause()  # every vCPU out of KVM_RUN at a clean point, devices still
        machine.snapshot(snapshot)  # state.json + a sparse memory.bin
    # The first machine is gone (its disk unlocked); the snapshot holds the guest.
    return restore_and_ask(snapshot, before, ticks_before)


def restore_and_ask(snapshot: Path, before: str, ticks_before: str) -> int:
    started = time.monotonic()
    with Machine.restore(snapshot) as restored:
        restored.start()
        try:
            note, after, ticks_after = ask(restored, CLOCK_COMMAND, CLOCK_ANSWER)
        except ConsoleTimeout as error:
            print(f"script_a_guest: after the restore: {error}", file=sys.stderr)
            return 1
        answered = time.monotonic() - started
        print(f"restored: /mnt/note.txt says {note}; answered {answered:.2f} s after restore()")
        print(f"its clock: {before} -> {after} s; its timer ticks: {ticks_before} -> {ticks_after}")
        return power_off(restored)


def power_off(machine: Machine) -> int:
    # The demo's /init runs `poweroff -f` when its shell exits.
    machine.serial.write(b"exit\n")
    outcome = machine.wait(timeout=COMMAND_SECONDS)
    if outcome is None:
        print("script_a_guest: the guest did not power off; stopping it", file=sys.stderr)
        machine.stop()
        return 1
    print(f"outcome: {outcome.reason} (status {outcome.status})")
    return outcome.status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
