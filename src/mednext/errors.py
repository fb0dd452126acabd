"""The exceptions mednext raises for problems the user can fix.

Every message names the file, field or value at fault and the fix. The command line prints
them without a traceback and exits with code 2. Most derive from ``ValueError``, so code that
caught ``ValueError`` before keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "ExampleScansUnavailable",
    "FolderBusyError",
    "ImageReadError",
    "LayoutError",
    "ShapeMismatchError",
    "UnsafeCheckpointError",
    "UnsafePathError",
    "UserError",
]


class UserError(Exception):
    """An error caused by the user's input or request: printed without a traceback, exit code 2."""


class ConfigError(ValueError):
    """A switch (a ``MEDNEXT_*`` variable or a setter's argument) with a value mednext does not know."""


class CheckpointError(ValueError):
    """A checkpoint file is missing pieces, truncated, corrupt or of an unknown kind."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint asks to call something other than plain data constructors."""


class LayoutError(ValueError):
    """A state dict whose keys match no layout mednext reads, or do not fit the model."""


class ShapeMismatchError(ValueError):
    """A tensor whose shape differs between the weights and the model."""


class DatasetError(ValueError):
    """A raw dataset problem the user must fix; the message names the file and the fix."""


class ImageReadError(ValueError):
    """An image that cannot be read completely (cut off, a failed checksum) or holds NaN/Inf voxels."""


class UnsafePathError(ValueError):
    """A name that would place a file outside its folder (path separators, ``..``, an absolute
    path, control characters), or a path that leaves the folder it must stay in."""


class FolderBusyError(UserError):
    """Another mednext command holds the folder this one would write (see ``mednext.files.folder_lock``)."""


class ExampleScansUnavailable(UserError):
    """The demo's example scans are not cached and could not be downloaded or unpacked."""
