"""A cache of host-decompressed kernels, keyed by the compressed payload's SHA-256.

Decompressing a distribution kernel takes a fraction of a second on the host
but the cache spares it on every boot of the same kernel. Entries are written
to a temporary file and renamed into place, so a reader never sees half an
entry. The cache only saves time: when it cannot be read or written the boot
goes on and says why in a note.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kvm_vmm.loaders.decompress import decompress_payload, identify_compression
from kvm_vmm.loaders.elf import is_elf

CACHE_SUBDIRECTORY = "kvm-vmm"


def default_cache_dir(environ: Mapping[str, str]) -> Path | None:
    """$XDG_CACHE_HOME/kvm-vmm, else ~/.cache/kvm-vmm; None without either variable.

    The XDG Base Directory Specification says a relative $XDG_CACHE_HOME is
    invalid and must be ignored.
    """
    xdg = environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / CACHE_SUBDIRECTORY
    home = environ.get("HOME", "")
    if home:
        return Path(home) / ".cache" / CACHE_SUBDIRECTORY
    return None


@dataclass(frozen=True)
class DecompressedKernel:
    data: bytes
    compression: str
    from_cache: bool
    cache_problem: str | None  # why the cache was not used, if it was not


@dataclass(frozen=True)
class DecompressedKernelCache:
    directory: Path

    def entry_path(self, payload: bytes) -> Path:
        return self.directory / f"vmlinux-{hashlib.sha256(payload).hexdigest()}.elf"

    def get_or_decompress(self, payload: bytes, max_size: int) -> DecompressedKernel:
        compression = identify_compression(payload).name
        path = self.entry_path(payload)
        try:
            cached = path.read_bytes()
        except FileNotFoundError:
            cached = None
        except OSError as error:
            data = decompress_payload(payload, max_size)
            return DecompressedKernel(data, compression, False, f"cannot read {path}: {error}")
        if cached is not None and is_elf(cached) and len(cached) <= max_size:
            return DecompressedKernel(cached, compression, True, None)
        data = decompress_payload(payload, max_size)
        return DecompressedKernel(data, compression, False, self._store(path, data))

    def _store(self, path: Path, data: bytes) -> str | None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, delete=False) as temporary:
                temporary_path = Path(temporary.name)
                try:
                    temporary.write(data)
                except OSError:
                    temporary_path.unlink(missing_ok=True)
                    raise
            try:
                os.replace(temporary_path, path)
            except OSError:
                temporary_path.unlink(missing_ok=True)
                raise
        except OSError as error:
            return f"cannot write {path}: {error}"
        return None


def decompress_kernel(payload: bytes, max_size: int, cache_dir: Path | None) -> DecompressedKernel:
    """Decompress ``payload``, through the cache in ``cache_dir`` unless it is None."""
    if cache_dir is None:
        data = decompress_payload(payload, max_size)
        return DecompressedKernel(data, identify_compression(payload).name, False, None)
    return DecompressedKernelCache(cache_dir).get_or_decompress(payload, max_size)
