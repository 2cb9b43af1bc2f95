"""Script a Linux guest through its serial console with the kvm_vmm library.

Boots the default guest (Debian's cloud kernel with a busybox shell as /init,
fetched with apt-get the first time and cached), waits for the shell's prompt,
runs one command, reads its answer off the console, then leaves the shell: the
guest's /init powers it off (ACPI S5) once the shell exits.

    python examples/script_a_guest.py

Where the host's KVM emulates guest kernel code (see `kvm-vmm host-check`) the
boot takes minutes. Exit status 0 once the guest has powered off.
"""

from __future__ import annotations

import re
import sys

from kvm_vmm import ConsoleTimeout, Machine, MachineConfig, default_guest

BOOT_SECONDS = 1200.0  # to the shell's prompt: minutes where guest kernel code is emulated
COMMAND_SECONDS = 120.0  # a fork+exec costs ~0.6 s there: a command line takes seconds
PROMPT = b"/ # "  # busybox sh's prompt for root in /
COMMAND = b"echo answer=$((6*7)) cpus=$(nproc) kernel=$(uname -r)\n"
# The shell echoes the typed line too ("answer=$((6*7)) ..."): only its output
# has digits right after "answer=".
ANSWER = re.compile(rb"answer=(\d+) cpus=(\d+) kernel=(\S+)")


def main() -> int:
    guest = default_guest()  # a LinuxBoot: kernel, initramfs, command line, fast boot on
    with Machine(MachineConfig(memory_size=512 << 20, cpus=1)) as machine:
        machine.boot(guest)
        machine.start()  # returns at once: the vCPUs run on their own threads
        try:
            machine.serial.expect(PROMPT, timeout=BOOT_SECONDS)
            machine.serial.write(COMMAND)  # typed on the guest's 16550A
            answer = machine.serial.expect(ANSWER, timeout=COMMAND_SECONDS)
        except ConsoleTimeout as error:  # its message ends with the console's last bytes
            print(f"script_a_guest: {error}", file=sys.stderr)
            return 1
        product, cpus, kernel = (group.decode() for group in answer.groups())
        print(f"6*7 = {product} on {cpus} CPU(s), Linux {kernel}")
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
    sys.exit(main())
