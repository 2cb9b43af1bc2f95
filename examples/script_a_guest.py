"""Script a Linux guest through its serial console with the kvm_vmm library.

Boots the default guest (Debian's cloud kernel with a busybox shell as /init,
fetched with apt-get the first time and cached), waits for the shell's prompt,
runs one command, reads its answer off the console, then leaves the shell: the
guest's /init powers it off (ACPI S5) once the shell exits. Given an ext4 image,
the guest gets it as a virtio-blk disk (its /init mounts it at /mnt) and a
virtio-rng, and the script reads /mnt/hello.txt and names the guest's entropy source.

    python examples/script_a_guest.py [EXT4_IMAGE]

Where the host's KVM emulates guest kernel code (see `kvm-vmm host-check`) the
boot takes minutes. Exit status 0 once the guest has powered off.
"""

from __future__ import annotations

import re
import sys
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
    b"echo hello=$(cat /mnt/hello.txt) rng=$(cat /sys/class/misc/hw_random/rng_current)\n"
)
DISK_ANSWER = re.compile(rb"hello=([^ ]+) rng=(\S+)\r?\n")


def main(argv: list[str]) -> int:
    disk = Path(argv[0]) if argv else None
    guest = default_guest()  # a LinuxBoot: kernel, initramfs, command line, fast boot on
    with Machine(MachineConfig(memory_size=512 << 20, cpus=1)) as machine:
        if disk is not None:
            machine.add_disk(disk)  # /dev/vda: virtio-blk on PCI
            machine.add_rng()  # /dev/hwrng: virtio-rng
        machine.boot(guest)
        machine.start()  # returns at once: the vCPUs run on their own threads
        try:
            machine.serial.expect(PROMPT, timeout=BOOT_SECONDS)
            machine.serial.write(COMMAND)  # typed on the guest's 16550A
            answer = machine.serial.expect(ANSWER, timeout=COMMAND_SECONDS)
            if disk is not None:
                machine.serial.write(DISK_COMMAND)
                found = machine.serial.expect(DISK_ANSWER, timeout=COMMAND_SECONDS)
        except ConsoleTimeout as error:  # its message ends with the console's last bytes
            print(f"script_a_guest: {error}", file=sys.stderr)
            return 1
        product, cpus, kernel = (group.decode() for group in answer.groups())
        print(f"6*7 = {product} on {cpus} CPU(s), Linux {kernel}")
        if disk is not None:
            hello, rng = (group.decode() for group in found.groups())
            print(f"/mnt/hello.txt says {hello}; entropy from {rng}")
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
