"""Checks that saved data has the shape a live object gives: the same keys, lengths, types.

A vCPU's registers come from kvmfast as nested dicts whose keys are KVM's structure
fields; rather than restate those fields here, a saved value is compared with what the
fresh VM's own vCPU returns for the same call (its template): a state file from another
kvm-vmm or a corrupted one then fails with the path of the first field that differs.
"""

from __future__ import annotations

U64 = (1 << 64) - 1


class ShapeError(ValueError):
    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}")


def check_like(value: object, template: object, path: str) -> None:
    """Raise :class:`ShapeError` unless ``value`` has ``template``'s shape: dicts with
    the same keys, lists of the same length, ints (never bools) in u64 range, strings."""
    if isinstance(template, dict):
        if not isinstance(value, dict):
            raise ShapeError(path, f"expected a mapping, found {type(value).__name__}")
        missing = sorted(set(template) - set(value))
        extra = sorted(str(key) for key in set(value) - set(template))
        if missing or extra:
            raise ShapeError(path, f"fields missing {missing} / unknown {extra}")
        for key, inner in template.items():
            check_like(value[key], inner, f"{path}.{key}")
    elif isinstance(template, list | tuple):
        if not isinstance(value, list) or len(value) != len(template):
            raise ShapeError(path, f"expected a list of {len(template)}")
        for index, (item, inner) in enumerate(zip(value, template, strict=True)):
            check_like(item, inner, f"{path}[{index}]")
    elif isinstance(template, bool):
        if not isinstance(value, bool):
            raise ShapeError(path, f"expected a bool, found {value!r:.40}")
    elif isinstance(template, int):
        check_u64(value, path)
    elif isinstance(template, str):
        if not isinstance(value, str):
            raise ShapeError(path, f"expected a string, found {value!r:.40}")
    else:  # a template type this module was not written for: a bug, not bad input
        raise TypeError(f"{path}: no shape check for {type(template).__name__}")


def check_u64(value: object, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U64:
        raise ShapeError(path, f"expected an unsigned 64-bit integer, found {value!r:.40}")
    return value


def hex_bytes(value: object, size: int, path: str) -> bytes:
    """``value`` as the hex text of exactly ``size`` bytes."""
    if not isinstance(value, str):
        raise ShapeError(path, "expected hex text")
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise ShapeError(path, "not hex text") from None
    if len(data) != size:
        raise ShapeError(path, f"{len(data)} bytes, expected {size}")
    return data


def int_pairs(value: object, path: str) -> dict[int, int]:
    """A JSON list of [key, value] pairs (JSON objects only have string keys)."""
    if not isinstance(value, list):
        raise ShapeError(path, "expected a list of [index, value] pairs")
    pairs: dict[int, int] = {}
    for position, pair in enumerate(value):
        where = f"{path}[{position}]"
        if not isinstance(pair, list) or len(pair) != 2:
            raise ShapeError(where, "expected [index, value]")
        key = check_u64(pair[0], where)
        if key in pairs:
            raise ShapeError(where, f"index {key:#x} given twice")
        pairs[key] = check_u64(pair[1], where)
    return pairs
