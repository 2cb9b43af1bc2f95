"""Reading the files a boot is made of, with errors that name them."""

from __future__ import annotations

from pathlib import Path

from kvm_vmm.loaders.errors import BootFileError


def read_boot_file(path: Path, what: str) -> bytes:
    """The contents of ``path``; ``what`` says what it is for ("kernel", "initrd")."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BootFileError(f"{what} file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise BootFileError(f"{what} file {str(path)!r} is a directory") from None
    except OSError as error:
        raise BootFileError(f"{what} file {str(path)!r} cannot be read: {error.strerror}") from None
