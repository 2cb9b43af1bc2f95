"""The snapshot directory: ``state.json`` (self-describing, versioned) and the memory file.

``state.json`` holds one JSON object:

* ``schema`` ("kvm-vmm-snapshot") and ``version`` (:data:`SCHEMA_VERSION`): a reader
  refuses another schema and any version it does not know, a newer one included;
* ``kvm_vmm``: the version that wrote it; ``created``: when (UTC, ISO 8601);
* ``host``: the facts the guest depends on (:mod:`kvm_vmm.snapshot.host_facts`);
* ``config``: memory size, vCPU count, emulation fallback; ``boot``: what was booted
  (a description for people, not used to restore);
* ``memory``: the memory file's name, size, and each RAM slot's guest address, size and
  file offset;
* ``devices``: what the restore rebuilds before restoring state, in order: virtio
  disks (path, options, image identity), virtio-rng, ``--device`` options;
* ``clock``: kvmclock (KVM_GET_CLOCK); ``vcpus``: each vCPU's state
  (:mod:`kvm_vmm.snapshot.vcpu_state`); ``platform``: every device's state by name
  (:mod:`kvm_vmm.machine_state`), a virtio device's queue positions included
  (:mod:`kvm_vmm.virtio_state`).

A snapshot is written into a temporary directory beside its destination and renamed
into place once complete, so a kill leaves the previous snapshot or none, never a part.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvm_vmm.snapshot.errors import SnapshotError
from kvm_vmm.snapshot.memory_file import MEMORY_FILE, RamSlot, memory_file_problem

SCHEMA = "kvm-vmm-snapshot"
SCHEMA_VERSION = 1
STATE_FILE = "state.json"
SYMBOLS_FILE = "symbols.map"  # optional: the System.map naming the guest's functions
MAX_STATE_BYTES = 64 << 20  # a state file is kilobytes; a larger one is not ours
TOP_LEVEL_KEYS = frozenset(
    {
        "schema",
        "version",
        "kvm_vmm",
        "created",
        "host",
        "config",
        "boot",
        "memory",
        "devices",
        "clock",
        "vcpus",
        "platform",
    }
)


@dataclass(frozen=True)
class MachineShape:
    memory_size: int
    cpus: int
    emulation_fallback: bool


@dataclass(frozen=True)
class SnapshotFile:
    """A state file read and checked at its top level; ``state`` is the whole object."""

    directory: Path
    state: dict[str, Any]
    shape: MachineShape
    slots: tuple[RamSlot, ...]

    @property
    def memory_path(self) -> Path:
        return self.directory / MEMORY_FILE


def read_snapshot(directory: Path) -> SnapshotFile:
    """The snapshot in ``directory``, its state file parsed and its top level, config
    and memory file checked; :class:`SnapshotError` otherwise."""
    if not directory.is_dir():
        raise SnapshotError(directory, "no such snapshot directory")
    path = directory / STATE_FILE
    try:
        with path.open("rb") as file:
            text = file.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        raise SnapshotError(directory, f"no {STATE_FILE}: not a snapshot") from None
    except OSError as error:
        raise SnapshotError(directory, f"{STATE_FILE} cannot be read: {error.strerror}") from None
    if len(text) > MAX_STATE_BYTES:
        raise SnapshotError(directory, f"{STATE_FILE} is over {MAX_STATE_BYTES} bytes")
    try:
        state = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SnapshotError(directory, f"{STATE_FILE} is not JSON ({error})") from None
    if not isinstance(state, dict) or state.get("schema") != SCHEMA:
        raise SnapshotError(directory, f"{STATE_FILE} is not a kvm-vmm snapshot's")
    version = state.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SnapshotError(directory, f"{STATE_FILE}: version {version!r} is not a number")
    if version > SCHEMA_VERSION:
        raise SnapshotError(
            directory,
            f"schema version {version} is newer than this kvm-vmm's ({SCHEMA_VERSION}):"
            f" it was written by kvm-vmm {state.get('kvm_vmm')}",
        )
    if version != SCHEMA_VERSION:
        raise SnapshotError(directory, f"schema version {version} is not one this kvm-vmm reads")
    missing = sorted(TOP_LEVEL_KEYS - set(state))
    unknown = sorted(set(state) - TOP_LEVEL_KEYS)
    if missing or unknown:
        raise SnapshotError(
            directory, f"{STATE_FILE}: fields missing {missing} / unknown {unknown}"
        )
    shape = _shape(directory, state["config"])
    slots = _slots(directory, state["memory"], shape.memory_size)
    problem = memory_file_problem(directory / MEMORY_FILE, shape.memory_size)
    if problem is not None:
        raise SnapshotError(directory, problem)
    return SnapshotFile(directory, state, shape, slots)


def _shape(directory: Path, config: object) -> MachineShape:
    if not isinstance(config, dict):
        raise SnapshotError(directory, "config is not a mapping")
    memory, cpus, fallback = (
        config.get("memory_size"),
        config.get("cpus"),
        config.get("emulation_fallback"),
    )
    if not _positive(memory) or not _positive(cpus) or not isinstance(fallback, bool):
        raise SnapshotError(directory, f"config {config!r:.200} is not a machine's")
    assert isinstance(memory, int) and isinstance(cpus, int)
    return MachineShape(memory, cpus, fallback)


def _slots(directory: Path, memory: object, size: int) -> tuple[RamSlot, ...]:
    if not isinstance(memory, dict) or memory.get("file") != MEMORY_FILE:
        raise SnapshotError(directory, "memory is not a description of its memory file")
    if memory.get("size") != size:
        raise SnapshotError(
            directory, f"memory size {memory.get('size')!r} is not the config's {size}"
        )
    slots = memory.get("slots")
    if not isinstance(slots, list):
        raise SnapshotError(directory, "memory.slots is not a list")
    parsed, offset = [], 0
    for index, slot in enumerate(slots):
        fields = (
            (slot.get("guest_phys_addr"), slot.get("size"), slot.get("file_offset"))
            if isinstance(slot, dict)
            else ()
        )
        if len(fields) != 3 or not all(_non_negative(value) for value in fields):
            raise SnapshotError(directory, f"memory.slots[{index}] is not a RAM slot")
        gpa, length, file_offset = (int(value) for value in fields)  # type: ignore[arg-type]
        if file_offset != offset:
            raise SnapshotError(directory, f"memory.slots[{index}] is not where the file has it")
        parsed.append(RamSlot(gpa, length, file_offset))
        offset += length
    if offset != size:
        raise SnapshotError(directory, f"memory.slots cover {offset} bytes, not {size}")
    return tuple(parsed)


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@contextlib.contextmanager
def snapshot_directory(destination: Path) -> Iterator[Path]:
    """A temporary directory to write a snapshot into, renamed to ``destination`` when
    the block ends without an exception (removed otherwise). An existing
    ``destination`` is replaced only if it is a snapshot (it has a kvm-vmm state file)
    or empty: anything else is the user's and is refused before anything is written."""
    destination = destination.absolute()
    if destination.exists() and not _replaceable(destination):
        raise SnapshotError(destination, "exists and is not a snapshot: refusing to replace it")
    if not destination.parent.is_dir():
        raise SnapshotError(destination, f"its directory {destination.parent} does not exist")
    temporary = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        yield temporary
        for name in os.listdir(temporary):
            _fsync(temporary / name)
        _fsync(temporary)
        if destination.exists():
            # Moved aside first: a kill between the renames leaves the old snapshot
            # beside its place, never a mixture of the two.
            old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", dir=destination.parent))
            os.rename(destination, old / "snapshot")
            os.rename(temporary, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temporary, destination)
        _fsync(destination.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _replaceable(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    if not any(directory.iterdir()):
        return True
    try:
        with (directory / STATE_FILE).open("rb") as file:
            head = file.read(4096)
    except OSError:
        return False
    return f'"schema": "{SCHEMA}"'.encode() in head


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(directory: Path, state: dict[str, object]) -> None:
    text = json.dumps({"schema": SCHEMA, "version": SCHEMA_VERSION, **state}, indent=1)
    (directory / STATE_FILE).write_text(text + "\n")
