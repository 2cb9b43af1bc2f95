"""QEMU's command line, as test harnesses build it, mapped onto ``kvm-vmm run``.

``kvm-vmm qemu ARGS...`` and the script ``kvm-vmm-qemu-system-x86_64`` take the
options kvm-unit-tests' ``x86/run`` passes to ``qemu-system-x86_64`` (QEMU's
syntax: one or two dashes, ``-opt value``, ``key=value`` suboptions separated by
commas, ``,,`` for a literal comma) and translate them into the arguments of
``kvm-vmm run``. :func:`translate` is pure; :func:`host_cpu_note` turns a
``-cpu`` request and what this host lets the VMM do (the host check, probed
once per host and cached) into the one line that says what the guest will
really see.

What kvm-vmm cannot honour is refused (:class:`QemuUsageError`, one line) or,
where the run is still what the harness wants, accepted with a one-line note.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import kvmfast
from kvm_vmm.cpuid import LEAF_FEATURES, CpuidEntry, cpuid_for_vcpu
from kvm_vmm.device_options import KNOWN_DEVICES, PCI_DEVICES
from kvm_vmm.hostcheck import Check, host_report

PROGRAM = "kvm-vmm-qemu-system-x86_64"
# The QEMU release whose options and behaviour this front end follows (the one
# docs/kvm-unit-tests.md compares kvm-vmm with); harnesses parse it from --help.
QEMU_VERSION = "7.2.0"
DEFAULT_MEMORY_MIB = 128  # QEMU's default -m
_SIZE = re.compile(r"(?i)^(\d+)([KMGT]?)B?$")
_SHIFTS = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}  # a plain -m number is MiB

# CPUID flags a -cpu +feature names, as QEMU spells them: (leaf, register, bit).
# Intel SDM Vol. 2A, CPUID: leaf 01H Table 3-10 (ECX), leaf 07H (EBX, ECX);
# AMD APM Vol. 3, Appendix E: Fn8000_0001 ECX/EDX, Fn8000_000A EDX.
CPU_FEATURES = {
    "vmx": (LEAF_FEATURES, "ecx", 5),
    "pcid": (LEAF_FEATURES, "ecx", 17),
    "x2apic": (LEAF_FEATURES, "ecx", 21),
    "tsc-deadline": (LEAF_FEATURES, "ecx", 24),
    "xsave": (LEAF_FEATURES, "ecx", 26),
    "invpcid": (0x7, "ebx", 10),
    "umip": (0x7, "ecx", 2),
    "pku": (0x7, "ecx", 3),
    "svm": (0x80000001, "ecx", 2),
    "skinit": (0x80000001, "ecx", 12),
    "rdtscp": (0x80000001, "edx", 27),
    "npt": (0x8000000A, "edx", 0),
}
LEAF_VENDOR = 0x0  # EBX, EDX, ECX: the vendor string (SDM Vol. 2A, CPUID leaf 00H)
LEAF_ADDRESS_SIZES = 0x80000008  # EAX[7:0]: physical address bits (APM Vol. 3, E.4.7)
# Models whose CPUID is the host's as KVM offers it: what kvm-vmm always gives.
HOST_MODELS = ("host", "max")
_REGISTER_INDEX = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}


class QemuUsageError(ValueError):
    """A QEMU option kvm-vmm does not take, or takes with other values (status 2)."""


@dataclass(frozen=True)
class CpuRequest:
    """``-cpu MODEL,+feat,-feat,key=value``: the model, each named feature wanted on or
    off, and each property (``vendor=``, ``phys-bits=``, ``host-phys-bits``...)."""

    model: str
    features: tuple[tuple[str, bool], ...] = ()
    properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class QemuRun:
    """A command line to run: ``kvm-vmm run``'s arguments, the -cpu request and the
    vCPU count (its note needs the host: :func:`host_cpu_note`), and one line for each
    thing not honoured."""

    run_args: tuple[str, ...]
    kernel: str
    cpu: CpuRequest | None
    cpus: int
    notes: tuple[str, ...]


@dataclass(frozen=True)
class QemuAnswer:
    """A command line that asks rather than runs (--help, -device ?): print ``text``."""

    text: str


def help_text() -> str:
    """QEMU's --help form: the first line names the version and this front end."""
    return "\n".join(
        [
            f"QEMU emulator version {QEMU_VERSION} (kvm-vmm's QEMU-compatible front end)",
            f"usage: {PROGRAM} [options] -kernel IMAGE",
            "",
            "The options kvm-unit-tests' x86/run passes, mapped onto kvm-vmm run:",
            "-kernel IMAGE    Multiboot or Linux kernel (kvm-vmm run --kernel)",
            "-initrd FILE     Multiboot module 0 / Linux initramfs (--initrd)",
            "-append STR      kernel command line (--cmdline)",
            "-smp N|cpus=N    vCPUs (--cpus)",
            f"-m SIZE          RAM, MiB unless suffixed (--memory; default {DEFAULT_MEMORY_MIB}M)",
            "-cpu MODEL[,+F]  accepted; the guest sees the host's CPUID as KVM offers it",
            "-device pc-testdev | isa-debug-exit[,iobase=..][,iosize=..] | pci-testdev (--device); "
            "-device ? lists them",
            "-serial stdio|null|none|file:PATH|chardev:ID, -chardev stdio|null|file,id=ID[,path=P]",
            "-machine [pc][,accel=kvm][,kernel-irqchip=split], -accel kvm, -enable-kvm",
            "-global kvm-pit.lost_tick_policy=discard|delay|slew",
            "-machine pit=off, -overcommit cpu-pm=on|mem-lock=on: accepted, ignored (a warning)",
            "-nodefaults, -no-reboot, -display none, -vnc none, -nographic",
            "kernel-irqchip=on and off are refused: kvm-vmm is a split-irqchip VMM.",
            "Exit status: kvm-vmm run's (kvm-vmm run --help).",
        ]
    )


def device_list() -> str:
    """``-device ?`` in QEMU's form (harnesses grep for the quoted names)."""
    lines = ["Misc devices:"]
    lines += [
        f'name "{name}", bus {"PCI" if name in PCI_DEVICES else "ISA"}'
        for name in sorted(KNOWN_DEVICES)
    ]
    return "\n".join(lines)


def split_suboptions(text: str) -> list[str]:
    """``a,b=c,,d`` -> ``["a", "b=c,d"]``: QEMU's comma list, ``,,`` a literal comma."""
    parts = [""]
    index = 0
    while index < len(text):
        if text.startswith(",,", index):
            parts[-1] += ","
            index += 2
        elif text[index] == ",":
            parts.append("")
            index += 1
        else:
            parts[-1] += text[index]
            index += 1
    return parts


def key_values(option: str, text: str, implied: str, allowed: Sequence[str]) -> dict[str, str]:
    """``-option``'s suboptions as a dict; a first bare word is the ``implied`` key."""
    values: dict[str, str] = {}
    for position, part in enumerate(split_suboptions(text)):
        key, sep, value = part.partition("=")
        if not sep:
            if position != 0:
                raise QemuUsageError(f"-{option} {text}: {part!r} is not key=value")
            key, value = implied, part
        if key not in allowed:
            raise QemuUsageError(
                f"-{option} {text}: kvm-vmm does not take {key!r} (takes: {', '.join(allowed)})"
            )
        values[key] = value
    return values


def memory_bytes(text: str) -> int:
    size = key_values("m", text, "size", ("size",))["size"]
    match = _SIZE.match(size)
    if match is None:
        raise QemuUsageError(f"-m {text}: expected a size such as 256, 256M or 1G")
    return int(match.group(1)) << _SHIFTS[match.group(2).upper()]


@dataclass
class _Translation:
    """The state of one command line while its options are read."""

    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    cpus: int = 1
    memory: int = DEFAULT_MEMORY_MIB << 20
    serial: str | None = None
    nographic: bool = False
    no_reboot: bool = False
    devices: list[str] = field(default_factory=list)
    chardevs: dict[str, str] = field(default_factory=dict)
    cpu: CpuRequest | None = None
    notes: list[str] = field(default_factory=list)
    answer: QemuAnswer | None = None

    def run(self) -> QemuRun:
        if self.kernel is None:
            raise QemuUsageError("no -kernel: kvm-vmm's QEMU front end boots -kernel images only")
        serial = self.serial or ("stdio" if self.nographic else "null")
        args = ["--kernel", self.kernel, "--cpus", str(self.cpus), "--memory", str(self.memory)]
        args += ["--serial", serial]
        if self.initrd is not None:
            args += ["--initrd", self.initrd]
        if self.append is not None:
            args += ["--cmdline", self.append]
        for device in self.devices:
            args += ["--device", device]
        notes = list(self.notes)
        if not self.no_reboot:
            notes.append("a guest reset ends the run, as with -no-reboot: kvm-vmm does not reboot")
        return QemuRun(tuple(args), self.kernel, self.cpu, self.cpus, tuple(notes))


def _flag(_: _Translation, __: str) -> None:
    """-nodefaults, -enable-kvm: what kvm-vmm does anyway (no default disks, NICs or
    display; always KVM)."""


def _no_reboot(state: _Translation, _: str) -> None:
    state.no_reboot = True


def _nographic(state: _Translation, _: str) -> None:
    state.nographic = True


def _only_none(option: str) -> Callable[[_Translation, str], None]:
    def handle(_: _Translation, value: str) -> None:
        if value != "none":
            raise QemuUsageError(f"-{option} {value}: kvm-vmm has no display (only -{option} none)")

    return handle


def _kernel(state: _Translation, value: str) -> None:
    state.kernel = value


def _initrd(state: _Translation, value: str) -> None:
    state.initrd = value


def _append(state: _Translation, value: str) -> None:
    state.append = value


def _smp(state: _Translation, value: str) -> None:
    options = key_values("smp", value, "cpus", ("cpus", "maxcpus"))
    try:
        cpus = int(options.get("cpus", "1"))
        maxcpus = int(options.get("maxcpus", str(cpus)))
    except ValueError:
        raise QemuUsageError(f"-smp {value}: not a number of CPUs") from None
    if maxcpus != cpus:
        raise QemuUsageError(f"-smp {value}: kvm-vmm has no CPU hotplug (maxcpus must be cpus)")
    state.cpus = cpus


def _memory(state: _Translation, value: str) -> None:
    state.memory = memory_bytes(value)


def _cpu(state: _Translation, value: str) -> None:
    model, *rest = split_suboptions(value)
    features: list[tuple[str, bool]] = []
    properties: list[tuple[str, str]] = []
    for item in rest:
        name, sep, setting = item.partition("=")
        if item[:1] in "+-" and item[1:]:
            features.append((item[1:], item[0] == "+"))
        elif not name:
            raise QemuUsageError(f"-cpu {value}: an empty feature name")
        elif not sep:  # QEMU: a bare word is NAME=on (host-phys-bits, hv_passthrough)
            features.append((name, True))
        elif setting in ("on", "off", "true", "false"):
            features.append((name, setting in ("on", "true")))
        else:
            properties.append((name, setting))
    state.cpu = CpuRequest(model, tuple(features), tuple(properties))


def _device(state: _Translation, value: str) -> None:
    driver = split_suboptions(value)[0]
    if driver in ("?", "help"):
        state.answer = QemuAnswer(device_list())
    elif driver in KNOWN_DEVICES:
        state.devices.append(value)
    else:
        known = ", ".join(sorted(KNOWN_DEVICES))
        raise QemuUsageError(f"-device {value}: kvm-vmm has no {driver!r} (it has: {known})")


def _machine(state: _Translation, value: str) -> None:
    options = key_values("machine", value, "type", ("type", "accel", "kernel-irqchip", "pit"))
    if options.get("type", "pc") != "pc":
        raise QemuUsageError(
            f"-machine {value}: kvm-vmm has one board, its split-irqchip PC (type pc)"
        )
    if options.get("pit", "on") != "on":
        # QEMU leaves the PIT out so that AVIC is not inhibited (kvm-unit-tests' vmexit_ipi);
        # kvm-vmm's IOAPIC, PIC and PIT are one board, and Linux probes the PIT.
        state.notes.append(f"-machine {value}: kvm-vmm always has its PIT (pit=off ignored)")
    if "accel" in options:
        _accelerators(f"-machine {value}", options["accel"])
    if "kernel-irqchip" in options:
        _irqchip(f"-machine {value}", options["kernel-irqchip"])


def _accel(state: _Translation, value: str) -> None:
    options = key_values("accel", value, "accel", ("accel", "kernel-irqchip"))
    _accelerators(f"-accel {value}", options["accel"])
    if "kernel-irqchip" in options:
        _irqchip(f"-accel {value}", options["kernel-irqchip"])


def _accelerators(where: str, accel: str) -> None:
    # QEMU tries "kvm:tcg" in order; kvm-vmm is KVM, so kvm must be among them.
    if "kvm" not in accel.split(":"):
        raise QemuUsageError(f"{where}: kvm-vmm runs guests with KVM only (accel=kvm)")


def _irqchip(where: str, mode: str) -> None:
    if mode != "split":
        raise QemuUsageError(
            f"{where}: refused: kvm-vmm is the split irqchip (LAPIC in KVM; IOAPIC, PIC and "
            "PIT in kvm-vmm), kernel-irqchip=split"
        )


def _global(state: _Translation, value: str) -> None:
    target, sep, setting = value.partition("=")
    if target != "kvm-pit.lost_tick_policy" or not sep:
        raise QemuUsageError(f"-global {value}: kvm-vmm takes only kvm-pit.lost_tick_policy")
    if setting not in ("discard", "delay", "slew"):
        raise QemuUsageError(f"-global {value}: lost_tick_policy is discard, delay or slew")
    if setting != "discard":
        state.notes.append(
            f"-global {value}: kvm-vmm's PIT discards lost ticks (lost_tick_policy=discard)"
        )


def _overcommit(state: _Translation, value: str) -> None:
    options = key_values("overcommit", value, "cpu-pm", ("cpu-pm", "mem-lock"))
    for key, setting in options.items():
        if setting not in ("on", "off"):
            raise QemuUsageError(f"-overcommit {value}: {key} is on or off")
        if setting == "on":
            # cpu-pm=on: HLT/MWAIT/PAUSE without exits (KVM_CAP_X86_DISABLE_EXITS);
            # mem-lock=on: mlock the guest's RAM. Both change speed, not behaviour.
            state.notes.append(f"-overcommit {value}: kvm-vmm does not do {key}=on (ignored)")


def _chardev(state: _Translation, value: str) -> None:
    options = key_values("chardev", value, "backend", ("backend", "id", "path"))
    backend, ident = options.get("backend", ""), options.get("id")
    if ident is None:
        raise QemuUsageError(f"-chardev {value}: needs id=")
    if backend in ("stdio", "null"):
        state.chardevs[ident] = backend
    elif backend == "file" and "path" in options:
        state.chardevs[ident] = f"file:{options['path']}"
    else:
        raise QemuUsageError(f"-chardev {value}: kvm-vmm takes stdio, null and file,path=")


def _serial(state: _Translation, value: str) -> None:
    if state.serial is not None:
        raise QemuUsageError(f"-serial {value}: kvm-vmm has one serial port (COM1)")
    if value.startswith("chardev:"):
        ident = value.removeprefix("chardev:")
        if ident not in state.chardevs:
            raise QemuUsageError(f"-serial {value}: no -chardev with id={ident} before it")
        state.serial = state.chardevs[ident]
    elif value in ("stdio", "null") or value.startswith("file:"):
        state.serial = value
    elif value == "none":
        state.serial = "null"
    else:
        raise QemuUsageError(f"-serial {value}: kvm-vmm takes stdio, null, none, file:PATH")


def _answer(text: str) -> Callable[[_Translation, str], None]:
    def handle(state: _Translation, _: str) -> None:
        state.answer = QemuAnswer(text)

    return handle


# Each option: whether it takes a value, and what it does to the translation.
OPTIONS: dict[str, tuple[bool, Callable[[_Translation, str], None]]] = {
    "nodefaults": (False, _flag),
    "enable-kvm": (False, _flag),
    "no-reboot": (False, _no_reboot),
    "nographic": (False, _nographic),
    "display": (True, _only_none("display")),
    "vnc": (True, _only_none("vnc")),
    "kernel": (True, _kernel),
    "initrd": (True, _initrd),
    "append": (True, _append),
    "smp": (True, _smp),
    "m": (True, _memory),
    "cpu": (True, _cpu),
    "device": (True, _device),
    "machine": (True, _machine),
    "M": (True, _machine),
    "accel": (True, _accel),
    "global": (True, _global),
    "overcommit": (True, _overcommit),
    "chardev": (True, _chardev),
    "serial": (True, _serial),
    "h": (False, _answer(help_text())),
    "help": (False, _answer(help_text())),
    "version": (False, _answer(help_text().splitlines()[0])),
}


def translate(argv: Sequence[str]) -> QemuRun | QemuAnswer:
    """A QEMU command line (without the program name) as kvm-vmm run's arguments, or
    the answer to a question it asks. Raises QemuUsageError naming the option."""
    state = _Translation()
    index = 0
    while index < len(argv):
        word = argv[index]
        name = word[2:] if word.startswith("--") else word[1:]
        if not word.startswith("-") or name not in OPTIONS:
            what = "a disk image" if not word.startswith("-") else "an option"
            raise QemuUsageError(f"{word}: {what} kvm-vmm's QEMU front end does not take")
        takes_value, handle = OPTIONS[name]
        value = ""
        if takes_value:
            if index + 1 >= len(argv):
                raise QemuUsageError(f"{word}: needs a value")
            index += 1
            value = argv[index]
        handle(state, value)
        if state.answer is not None:
            return state.answer
        index += 1
    return state.run()


def kernel_load_error(run: QemuRun) -> str | None:
    """QEMU's line for a -kernel it cannot open, or None. kvm-unit-tests' runner starts
    each test once with a kernel that does not exist and takes any other answer (an
    option refused, say) as the reason to skip the test (scripts/vmm.bash,
    qemu_parse_premature_failure), so this must be QEMU's wording."""
    try:
        with open(run.kernel, "rb"):
            return None
    except OSError as error:
        return f"could not load kernel '{run.kernel}': {error.strerror}"


def cpuid_register(entries: Sequence[CpuidEntry], leaf: int, register: str) -> int:
    for entry in entries:
        if entry[0] == leaf and entry[1] == 0:
            return entry[_REGISTER_INDEX[register]]
    return 0


def cpuid_flag(entries: Sequence[CpuidEntry], leaf: int, register: str, bit: int) -> bool:
    return bool(cpuid_register(entries, leaf, register) >> bit & 1)


def guest_vendor(entries: Sequence[CpuidEntry]) -> str:
    words = (cpuid_register(entries, LEAF_VENDOR, r) for r in ("ebx", "edx", "ecx"))
    return b"".join(word.to_bytes(4, "little") for word in words).decode("latin-1")


def guest_phys_bits(entries: Sequence[CpuidEntry]) -> int:
    return cpuid_register(entries, LEAF_ADDRESS_SIZES, "eax") & 0xFF


def _property_seen(name: str, value: str, entries: Sequence[CpuidEntry]) -> tuple[str, bool]:
    """What the guest sees of a ``-cpu`` property, and whether it is what was asked."""
    if name == "vendor":
        vendor = guest_vendor(entries)
        return f"vendor: {vendor}", vendor == value
    if name == "phys-bits":
        bits = guest_phys_bits(entries)
        return f"phys-bits: {bits}", str(bits) == value
    return f"{name}={value}: not honoured by kvm-vmm", False


def _feature_seen(name: str, wanted: bool, entries: Sequence[CpuidEntry]) -> tuple[str, bool]:
    """What the guest sees of a ``-cpu`` feature, and whether it is what was asked."""
    if name == "host-phys-bits":  # the guest's width is always the host's
        return f"phys-bits: {guest_phys_bits(entries)} (the host's)", wanted
    if name not in CPU_FEATURES:
        return f"{name}: not honoured by kvm-vmm", False
    present = cpuid_flag(entries, *CPU_FEATURES[name])
    return f"{name}: {'on' if present else 'off'}", present == wanted


def cpu_note(
    request: CpuRequest, guest_cpuid: Sequence[CpuidEntry], cpuid_check: str | None
) -> str | None:
    """The line that says what a ``-cpu`` request gets: kvm-vmm has no CPU models, so
    the guest sees ``guest_cpuid`` (the host's as KVM offers it, kvm_vmm.cpuid); each
    feature and property named is reported as the guest will see it. ``cpuid_check``:
    the host check's summary when this host does not let the VMM set the guest's CPUID
    (None when it does). None when the request is what the guest gets anyway."""
    answers = [_feature_seen(name, on, guest_cpuid) for name, on in request.features]
    answers += [_property_seen(name, value, guest_cpuid) for name, value in request.properties]
    differs = request.model not in HOST_MODELS or not all(same for _, same in answers)
    if not differs and cpuid_check is None:
        return None
    spec = ",".join(
        [
            request.model,
            *(("+" if on else "-") + name for name, on in request.features),
            *(f"{name}={value}" for name, value in request.properties),
        ]
    )
    line = f"-cpu {spec}: the guest sees this host's CPUID as KVM offers it"
    if answers:
        line += f" ({'; '.join(seen for seen, _ in answers)})"
    if cpuid_check is not None:
        line += f"; this host's KVM does not let the VMM set it (host-check: {cpuid_check})"
    return line


def host_cpu_note(request: CpuRequest, cpus: int, cache_dir: Path | None) -> str | None:
    """:func:`cpu_note` on this host: the guest CPUID kvm-vmm gives, and the host
    check's verdict on whether the VMM's CPUID reaches the guest (cached per host)."""
    guest_cpuid = cpuid_for_vcpu(kvmfast.Kvm().supported_cpuid(), 0, cpus)
    check = next((c for c in host_report(cache_dir).checks if c.key == "cpuid"), None)
    refused = None if check is not None and check.verdict == "PASS" else _summary(check)
    return cpu_note(request, guest_cpuid, refused)


def _summary(check: Check | None) -> str:
    return "no CPUID check ran" if check is None else check.summary
