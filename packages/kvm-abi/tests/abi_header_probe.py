"""Measures kvm_abi and the installed <linux/kvm.h> the same way, to compare them.

From kvm_abi's own structs and constants this builds (a) the layout facts ctypes gives
and (b) a C program that prints the same facts as GCC sees them in the header:
sizeof/_Alignof of every struct, offsetof/sizeof/signedness of every member reachable
by a C path (members of inline and anonymous structs and unions included), the bytes a
set bit-field covers, and the value of every constant. Both are dicts keyed alike,
e.g. ``"offsetof kvm_run.io.port"``, so a difference names the member.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIGNED_CODES = frozenset("bhilq")
UNSIGNED_CODES = frozenset("BHILQ")


@dataclass(frozen=True)
class Member:
    """One member as C names it: ``io.port`` in ``struct kvm_run``."""

    c_path: str
    offset: int
    ctype: Any
    bit_width: int | None  # set for a bit-field, which has no offsetof or sizeof


def _element_type(array_type: Any) -> tuple[Any, int, bool]:
    """The innermost element type of a (nested) array, its depth, and whether it is empty."""
    depth, empty = 0, False
    current: Any = array_type
    while isinstance(current, type) and issubclass(current, ctypes.Array):
        array: Any = current  # typeshed types _length_ on instances only
        empty = empty or array._length_ == 0
        current = array._type_
        depth += 1
    return current, depth, empty


def _is_aggregate(ctype: Any) -> bool:
    return isinstance(ctype, type) and issubclass(ctype, ctypes.Structure | ctypes.Union)


def members(struct_type: Any, prefix: str = "", base: int = 0) -> Iterator[Member]:
    """Every member of ``struct_type`` that C can name, depth first.

    Recurses into the types that have no C name of their own (private ``_kvm_*`` classes,
    anonymous members); a member whose type is a named kvm_* struct is checked as that
    struct, not again here.
    """
    anonymous = set(getattr(struct_type, "_anonymous_", ()))
    for field in struct_type._fields_:
        name, ctype = field[0], field[1]
        offset = base + getattr(struct_type, name).offset
        path = prefix if name in anonymous else f"{prefix}.{name}".lstrip(".")
        if len(field) == 3:
            yield Member(path, offset, ctype, field[2])
            continue
        if name not in anonymous:
            yield Member(path, offset, ctype, None)
        element, depth, empty = _element_type(ctype)
        if _is_aggregate(element) and not empty and element.__name__.startswith("_"):
            yield from members(element, path + "[0]" * depth, offset)


def _flexible(ctype: Any) -> bool:
    return _element_type(ctype)[2]


def _signedness(ctype: Any) -> int | None:
    code = getattr(ctype, "_type_", None)
    if not isinstance(code, str):
        return None
    if code in SIGNED_CODES:
        return 1
    if code in UNSIGNED_CODES:
        return 0
    return None


def _set_bitfield_image(struct_type: Any, member: Member) -> str:
    """The struct's bytes, all zero but for the bit-field set to all ones."""
    assert member.bit_width is not None
    value = struct_type()
    *parents, leaf = re.split(r"\.", member.c_path)
    target = value
    for part in parents:
        match = re.fullmatch(r"(\w+)((?:\[\d+\])*)", part)
        assert match is not None
        target = getattr(target, match.group(1))
        for index in re.findall(r"\[(\d+)\]", match.group(2)):
            target = target[int(index)]
    setattr(target, leaf, (1 << member.bit_width) - 1)
    return bytes(value).hex()


def python_facts(structs: Mapping[str, Any], constants: Mapping[str, int]) -> dict[str, str]:
    """The facts as kvm_abi (ctypes) states them."""
    facts: dict[str, str] = {}
    for name, struct_type in structs.items():
        facts[f"sizeof {name}"] = str(ctypes.sizeof(struct_type))
        facts[f"alignof {name}"] = str(ctypes.alignment(struct_type))
        for member in members(struct_type):
            where = f"{name}.{member.c_path}"
            if member.bit_width is not None:
                facts[f"bits {where}"] = _set_bitfield_image(struct_type, member)
                continue
            facts[f"offsetof {where}"] = str(member.offset)
            if not _flexible(member.ctype):
                facts[f"sizeof {where}"] = str(ctypes.sizeof(member.ctype))
            signed = _signedness(member.ctype)
            if signed is not None:
                facts[f"signed {where}"] = str(signed)
    for name, value in constants.items():
        facts[f"const {name}"] = str(value)
    return facts


def c_program(structs: Mapping[str, Any], constants: Mapping[str, int]) -> str:
    """A C program that prints, from the header, every fact python_facts states."""
    lines = [
        "#include <linux/kvm.h>",
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <string.h>",
        '#define FACT(key, value) printf("%s %llu\\n", key, (unsigned long long)(value))',
        "static void image(const char *key, const void *bytes, size_t size) {",
        '    printf("%s ", key);',
        '    for (size_t i = 0; i < size; i++) printf("%02x", ((const unsigned char *)bytes)[i]);',
        '    printf("\\n");',
        "}",
        "int main(void) {",
    ]
    for name, struct_type in structs.items():
        c_type = f"struct {name}"
        lines.append(f'    FACT("sizeof {name}", sizeof({c_type}));')
        lines.append(f'    FACT("alignof {name}", _Alignof({c_type}));')
        for member in members(struct_type):
            where = f"{name}.{member.c_path}"
            access = f"((({c_type} *)0)->{member.c_path})"
            if member.bit_width is not None:
                ones = (1 << member.bit_width) - 1
                lines.append(
                    f"    {{ {c_type} v; memset(&v, 0, sizeof v); v.{member.c_path} = {ones};"
                    f' image("bits {where}", &v, sizeof v); }}'
                )
                continue
            lines.append(f'    FACT("offsetof {where}", offsetof({c_type}, {member.c_path}));')
            if not _flexible(member.ctype):
                lines.append(f'    FACT("sizeof {where}", sizeof{access});')
            if _signedness(member.ctype) is not None:
                lines.append(f'    FACT("signed {where}", (__typeof__{access})-1 < 0);')
    for name in constants:
        lines.append(f'    FACT("const {name}", {name});')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class InstalledHeader:
    """What the C compiler sees through ``#include <linux/kvm.h>``."""

    compiler: str
    defines: Mapping[str, str]  # object-like macros: name -> body
    struct_names: frozenset[str]  # every ``struct kvm_*`` defined

    @property
    def linux_version(self) -> tuple[int, int]:
        code = int(self.defines["LINUX_VERSION_CODE"], 0)
        return code >> 16, (code >> 8) & 0xFF


class HeaderUnavailable(Exception):
    """No compiler, or no <linux/kvm.h>: the reason to skip."""


def find_installed_header() -> InstalledHeader:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise HeaderUnavailable("no C compiler (gcc or cc) to read <linux/kvm.h> with")
    source = "#include <linux/version.h>\n#include <linux/kvm.h>\n"
    dump = subprocess.run(
        [compiler, "-E", "-dM", "-x", "c", "-"], input=source, capture_output=True, text=True
    )
    if dump.returncode != 0:
        raise HeaderUnavailable(
            f"<linux/kvm.h> is not installed (Debian: linux-libc-dev): {dump.stderr.strip()}"
        )
    defines = {}
    for line in dump.stdout.splitlines():
        match = re.fullmatch(r"#define (\w+)(\()?\s*(.*)", line)
        if match and not match.group(2):
            defines[match.group(1)] = match.group(3)
    expanded = subprocess.run(
        [compiler, "-E", "-P", "-x", "c", "-"],
        input=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    struct_names = frozenset(re.findall(r"\bstruct\s+(kvm_\w+)\s*\{", expanded))
    return InstalledHeader(compiler, defines, struct_names)


def header_facts(header: InstalledHeader, program: str, workdir: Path) -> dict[str, str]:
    """Compiles and runs ``program`` against the installed header; its printed facts."""
    source = workdir / "kvm_abi_probe.c"
    binary = workdir / "kvm_abi_probe"
    source.write_text(program)
    build = subprocess.run(
        [header.compiler, "-std=gnu11", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        # GCC names the struct and member it does not know, which is the finding.
        raise AssertionError(f"the probe does not compile against the header:\n{build.stderr}")
    output = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    facts = {}
    for line in output.splitlines():
        key, _, value = line.rpartition(" ")
        facts[key] = value
    return facts
