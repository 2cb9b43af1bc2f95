"""Why a kernel could not be loaded.

Every error is a :class:`LoaderError`, itself a ``ValueError``: the input file
or the options are wrong, never the VMM. Messages name the file's offending
field or byte and what was expected.
"""

from __future__ import annotations


class LoaderError(ValueError):
    """A kernel, module or initrd cannot be booted as given."""


class BootFileError(LoaderError):
    """A file named on the command line cannot be read."""


class ImageFormatError(LoaderError):
    """The file is not the format it claims to be (bad magic, bad checksum)."""


class TruncatedImageError(ImageFormatError):
    """The file ends before a part its own headers promise."""


class UnsupportedImageError(LoaderError):
    """A well-formed image asks for something this loader does not provide."""


class DecompressionError(LoaderError):
    """A compressed kernel payload cannot be decompressed."""


class MissingDecompressorError(DecompressionError):
    """The payload's compressor needs a Python package that is not installed."""


class PlacementError(LoaderError):
    """The image does not fit the guest's memory map."""


class CommandLineError(LoaderError):
    """The kernel command line is longer than the kernel or the VMM accepts."""
