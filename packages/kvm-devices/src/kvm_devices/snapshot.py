"""One validator for every device's snapshot, driven by its state dataclass.

A device's state is a dataclass whose field annotations say what a value may be:
``int`` (never a bool), ``bool``, ``bytes``, ``str``, an :class:`~enum.Enum`, ``X | None``,
``list[T]`` or ``tuple[T, ...]``, a fixed ``tuple[A, B, C]``, or another state dataclass.
``typing.Annotated`` metadata narrows them: :class:`Range` (or :func:`bits`),
:class:`Mask`, :class:`OneOf` for ints, :class:`Length` for sequences and bytes. A
dataclass may define ``check_invariants()`` for rules across its fields; it raises
:class:`StateError` with the path of the field at fault, relative to that dataclass.

A snapshot crosses a process boundary (a state file), so it is host input: a malformed
one is refused with one :class:`StateError` naming the device, the field path and what
is wrong, before any device state changes. :func:`state_to_data` gives the JSON form
(bytes as lowercase hex, enums as their values, tuples as lists) that
:func:`state_from_data` reads back.
"""

from __future__ import annotations

import abc
import binascii
import copy
import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

StateT = TypeVar("StateT")


class StateError(ValueError):
    """A snapshot that cannot be restored: which device, which field, what is wrong."""

    def __init__(self, path: str, problem: str, device: str = "") -> None:
        self.device = device
        self.path = path
        self.problem = problem
        where = f"{device} state" if device else "state"
        super().__init__(f"{where}: {path or '<top>'}: {problem}")

    def within(self, prefix: str = "", device: str = "") -> StateError:
        """The same error seen from an enclosing field (``prefix``) or device."""
        path = ".".join(part for part in (prefix, self.path) if part)
        if prefix and self.path.startswith("["):
            path = prefix + self.path
        return StateError(path, self.problem, self.device or device)


@dataclass(frozen=True)
class Range:
    """An int in ``[low, high]``; ``None`` leaves that side open."""

    low: int | None = 0
    high: int | None = None

    def check(self, value: int) -> str | None:
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            low = "-inf" if self.low is None else hex(self.low)
            high = "inf" if self.high is None else hex(self.high)
            return f"{value:#x} is outside [{low}, {high}]"
        return None


def bits(width: int) -> Range:
    """An unsigned int of ``width`` bits."""
    return Range(0, (1 << width) - 1)


@dataclass(frozen=True)
class Mask:
    """A non-negative int with no bit outside ``allowed``."""

    allowed: int

    def check(self, value: int) -> str | None:
        if value < 0 or value & ~self.allowed:
            return f"{value:#x} sets bits outside {self.allowed:#x}"
        return None


@dataclass(frozen=True)
class OneOf:
    """One of the listed values."""

    values: tuple[object, ...]

    def check(self, value: object) -> str | None:
        if value not in self.values:
            return f"{value!r} is not one of {list(self.values)!r}"
        return None


@dataclass(frozen=True)
class Length:
    """A sequence (or bytes) of exactly ``exact`` items, or of at most ``most``."""

    exact: int | None = None
    most: int | None = None

    def check(self, length: int) -> str | None:
        if self.exact is not None and length != self.exact:
            return f"has {length} items, not {self.exact}"
        if self.most is not None and length > self.most:
            return f"has {length} items, more than {self.most}"
        return None


_Check = Callable[[object, str], object]


class Snapshotting(abc.ABC, Generic[StateT]):
    """:class:`~kvm_devices.interfaces.Snapshottable`'s JSON half, from its typed half."""

    @abc.abstractmethod
    def save_state(self) -> StateT: ...

    @abc.abstractmethod
    def check_state(self, data: object) -> StateT: ...

    @abc.abstractmethod
    def restore_state(self, state: StateT) -> None: ...

    def save(self) -> dict[str, object]:
        """The state in its JSON form."""
        return state_to_data(self.save_state())

    def restore(self, data: object) -> None:
        """Check ``data`` whole (StateError, nothing changed), then restore it."""
        self.restore_state(self.check_state(data))


def state_from_data(cls: type[StateT], data: object, device: str) -> StateT:
    """Build a ``cls`` from its JSON form, or raise :class:`StateError` naming ``device``."""
    annotation: Any = cls
    try:
        result = _converter(annotation)(data, "")
    except StateError as error:
        raise error.within(device=device) from None
    assert isinstance(result, cls)
    return result


def state_to_data(state: object) -> dict[str, object]:
    """The JSON form of a state dataclass (see the module documentation)."""
    data = _to_data(state)
    assert isinstance(data, dict)
    return data


def detached(state: StateT) -> StateT:
    """A deep copy, so that neither side of a save or restore aliases the other."""
    return copy.deepcopy(state)


def _to_data(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return _to_data(value.value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, list | tuple):
        return [_to_data(item) for item in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    raise TypeError(f"{type(value).__name__} has no JSON form")


@functools.cache
def _converter(tp: Any) -> _Check:
    """The checker of values of annotation ``tp``: returns the value, typed, or raises."""
    constraints: tuple[object, ...] = ()
    if typing.get_origin(tp) is typing.Annotated:
        tp, *extra = typing.get_args(tp)
        constraints = tuple(extra)
    base = _base_converter(tp)
    if not constraints:
        return base

    def constrained(value: object, path: str) -> object:
        result = base(value, path)
        for constraint in constraints:
            subject: object = result
            if isinstance(constraint, Length):
                assert isinstance(result, list | tuple | bytes)
                subject = len(result)
            check = getattr(constraint, "check", None)
            problem = check(subject) if check is not None else None
            if problem is not None:
                raise StateError(path, str(problem))
        return result

    return constrained


def _base_converter(tp: Any) -> _Check:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is bool:
        return _exact(bool)
    if tp is int:
        return _exact(int)
    if tp is str:
        return _exact(str)
    if tp is bytes:
        return _bytes
    if origin in (types.UnionType, typing.Union) and type(None) in args and len(args) == 2:
        inner = _converter(next(arg for arg in args if arg is not type(None)))
        return lambda value, path: None if value is None else inner(value, path)
    if origin in (list, tuple):
        return _sequence(origin, args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp)
    raise TypeError(f"no state validator for annotation {tp!r}")


def _exact(kind: type) -> _Check:
    def check(value: object, path: str) -> object:
        # bool is an int subclass: a True where an int belongs is a foreign file.
        if type(value) is not kind:
            raise StateError(path, f"{_short(value)} is not {kind.__name__}")
        return value

    return check


def _bytes(value: object, path: str) -> object:
    if not isinstance(value, str):
        raise StateError(path, f"{_short(value)} is not a hex string")
    try:
        return binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        raise StateError(path, f"{_short(value)} is not an even number of hex digits") from None


def _sequence(origin: object, args: tuple[Any, ...]) -> _Check:
    fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
    items = [_converter(arg) for arg in args] if fixed else [_converter(args[0])]
    make = tuple if origin is tuple else list

    def check(value: object, path: str) -> object:
        if not isinstance(value, list | tuple):
            raise StateError(path, f"{_short(value)} is not a list")
        if fixed and len(value) != len(items):
            raise StateError(path, f"has {len(value)} items, not {len(items)}")
        converters = items if fixed else items * len(value)
        return make(
            convert(item, f"{path}[{index}]")
            for index, (convert, item) in enumerate(zip(converters, value, strict=True))
        )

    return check


def _enum(cls: type[enum.Enum]) -> _Check:
    def check(value: object, path: str) -> object:
        for member in cls:
            if type(member.value) is type(value) and member.value == value:
                return member
        raise StateError(path, f"{_short(value)} is not a {cls.__name__}")

    return check


def _dataclass(cls: type) -> _Check:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [(f.name, _converter(hints[f.name])) for f in dataclasses.fields(cls)]
    names = {name for name, _ in fields}

    def check(value: object, path: str) -> object:
        if not isinstance(value, Mapping):
            raise StateError(path, f"{_short(value)} is not a mapping of {cls.__name__}")
        missing = sorted(names - set(value))
        if missing:
            raise StateError(path, f"missing field(s) {', '.join(missing)}")
        extra = sorted(str(key) for key in set(value) - names)
        if extra:
            raise StateError(path, f"unknown field(s) {', '.join(extra)}")
        built = cls(**{name: convert(value[name], _join(path, name)) for name, convert in fields})
        invariants = getattr(built, "check_invariants", None)
        if invariants is not None:
            try:
                invariants()
            except StateError as error:
                raise error.within(prefix=path) from None
        return built

    return check


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
