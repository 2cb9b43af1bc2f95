"""``--disk path=FILE[,readonly=on][,serial=ID][,direct=on]``, Cloud Hypervisor's spelling.

``--disk FILE[,...]`` is short for ``path=FILE``.

Only the words are checked here; the image itself (missing, unreadable, empty, in use by
another VMM) is judged when kvmfast opens it, with a message naming the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# virtio 1.2 §5.2.6: VIRTIO_BLK_T_GET_ID returns 20 bytes, NUL-padded.
SERIAL_LENGTH = 20

_SWITCHES = {"on": True, "off": False, "true": True, "false": False}


class DiskSpecError(ValueError):
    """A --disk value we do not understand, with what we do."""


@dataclass(frozen=True)
class DiskSpec:
    path: Path
    readonly: bool = False
    serial: str | None = None
    direct: bool = False


def _switch(text: str, key: str, value: str) -> bool:
    try:
        return _SWITCHES[value.lower()]
    except KeyError:
        raise DiskSpecError(f"--disk {text!r}: {key}={value!r} is not on or off") from None


def parse_disk_spec(text: str) -> DiskSpec:
    path: str | None = None
    readonly = direct = False
    serial: str | None = None
    for index, pair in enumerate(text.split(",")):
        key, sep, value = pair.partition("=")
        if not sep and index == 0:
            key, value = "path", pair  # ``--disk FILE`` for ``--disk path=FILE``
        elif not sep:
            raise DiskSpecError(
                f"--disk {text!r}: {pair!r} is not KEY=VALUE "
                "(path=FILE[,readonly=on][,serial=ID][,direct=on])"
            )
        if key == "path":
            if not value:
                raise DiskSpecError(f"--disk {text!r}: path= is empty")
            path = value
        elif key == "readonly":
            readonly = _switch(text, key, value)
        elif key == "direct":
            direct = _switch(text, key, value)
        elif key == "serial":
            encoded = value.encode()
            if len(encoded) > SERIAL_LENGTH or not value.isprintable():
                raise DiskSpecError(
                    f"--disk {text!r}: serial={value!r} must be at most {SERIAL_LENGTH}"
                    " printable bytes"
                )
            serial = value
        else:
            raise DiskSpecError(
                f"--disk {text!r}: unknown option {key!r} (path, readonly, serial, direct)"
            )
    if path is None:
        raise DiskSpecError(f"--disk {text!r}: path=FILE is missing")
    return DiskSpec(Path(path), readonly=readonly, serial=serial, direct=direct)
