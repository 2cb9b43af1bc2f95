"""Checks shared by the devices' ``restore()``: a snapshot is host input, so a
malformed one is refused with ValueError naming the field, never half-applied."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields


def fields_of(data: object, cls: type) -> Mapping[str, object]:
    """``data`` as a mapping with exactly the fields of dataclass ``cls``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} snapshot must be a mapping")
    expected = {f.name for f in fields(cls)}
    if set(data) != expected:
        raise ValueError(f"{cls.__name__} snapshot fields {sorted(data)} != {sorted(expected)}")
    return data


def int_field(
    data: Mapping[str, object], name: str, low: int | None = None, high: int | None = None
) -> int:
    """An int (not a bool) within ``[low, high]`` where those are given."""
    value = data[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, not {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], not {value}")
    return value


def bool_field(data: Mapping[str, object], name: str) -> bool:
    value = data[name]
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, not {value!r}")
    return value
