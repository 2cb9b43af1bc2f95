"""A disk image's identity: a snapshot's guest has the image's contents cached in its
page cache and its filesystem's state in RAM, so it may only continue on the same image,
unchanged since the snapshot."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from kvm_vmm.snapshot.errors import SnapshotError

IDENTITY_KEYS = ("device", "inode", "size", "mtime_ns")


def disk_identity(path: Path) -> dict[str, int]:
    status = os.stat(path)
    return {
        "device": status.st_dev,
        "inode": status.st_ino,
        "size": status.st_size,
        "mtime_ns": status.st_mtime_ns,
    }


def identity_problem(path: Path, saved: Mapping[str, object]) -> str | None:
    """Why ``path`` is not the image the snapshot was taken with, or None."""
    try:
        now = disk_identity(path)
    except FileNotFoundError:
        return f"its disk image {path} is missing"
    except OSError as error:
        return f"its disk image {path} cannot be read: {error.strerror}"
    changed = [key for key in IDENTITY_KEYS if saved.get(key) != now[key]]
    if not changed:
        return None
    what = ", ".join(changed)
    return (
        f"its disk image {path} changed since the snapshot ({what} differ): the guest's"
        " cached view of it would be wrong (--force restores anyway)"
    )


DEVICE_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "device-option": {"spec": (str,)},
    "virtio-blk": {
        "path": (str,),
        "readonly": (bool,),
        "serial": (str, type(None)),
        "direct": (bool,),
        "identity": (dict,),
    },
    "virtio-rng": {},
    "virtio-net": {"tap": (str,), "mac": (str,)},
    "virtio-vsock": {"cid": (int,), "socket": (str,)},
}


def rebuild_records(directory: Path, devices: object, force: bool) -> list[dict[str, object]]:
    """The state file's ``devices``: each checked for its fields, each disk image for
    its identity (unless ``force``); :class:`SnapshotError` otherwise."""
    if not isinstance(devices, list):
        raise SnapshotError(directory, "devices is not a list")
    records = []
    for index, record in enumerate(devices):
        where = f"devices[{index}]"
        kind = record.get("kind") if isinstance(record, dict) else None
        if not isinstance(record, dict) or kind not in DEVICE_FIELDS:
            raise SnapshotError(directory, f"{where} is not a device kvm-vmm rebuilds")
        fields = DEVICE_FIELDS[str(kind)]
        if set(record) != {"name", "kind", *fields} or not isinstance(record["name"], str):
            raise SnapshotError(directory, f"{where}: not the fields of a {kind} device")
        for field, types in fields.items():
            if not isinstance(record[field], types) or (
                isinstance(record[field], bool) and bool not in types
            ):
                raise SnapshotError(directory, f"{where}.{field}: {record[field]!r:.60} is wrong")
        if kind == "virtio-blk" and not force:
            problem = identity_problem(Path(record["path"]), record["identity"])
            if problem is not None:
                raise SnapshotError(directory, problem)
        records.append(record)
    return records
