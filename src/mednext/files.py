"""Writing files whole or not at all, and choosing the device: one helper for each job.

Every file mednext writes (checkpoints, exports, predictions' JSON, evaluations, plots) goes
through :func:`atomic_write`: the content goes to a temporary file in the target's folder, is
flushed to disk, and is then renamed over the target, so an interrupted run never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mednext.errors import UnsafePathError

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "check_plain_name",
    "inside",
    "resolve_device",
    "temporary_path_beside",
]


def check_plain_name(name: str, what: str) -> str:
    """Return ``name`` if it can be a file name inside a folder: not empty, not ``.`` or ``..``, no
    ``/`` or ``\\``, no control characters (which also rules out absolute paths). ``what`` says
    where the name came from, for the error (an UnsafePathError)."""
    bad = ""
    if not isinstance(name, str) or not name:
        bad = "is empty"
    elif name in (".", ".."):
        bad = "is a relative folder name"
    elif "/" in name or "\\" in name:
        bad = "contains a path separator"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        bad = "contains a control character"
    if bad:
        raise UnsafePathError(
            f"{what} {name!r} {bad}; it names files in the working folders, so it must be a plain name "
            "(letters, digits, '_', '-', '.'), e.g. case_001"
        )
    return name


def inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """``path`` (absolute, or relative to ``root``) if it stays inside ``root`` once ``..`` and links
    are resolved; else an UnsafePathError naming both."""
    base = Path(root).resolve()
    target = (base / path).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{path} would be written outside {root}; refusing to write there")
    return Path(root) / Path(path) if not Path(path).is_absolute() else Path(path)


def temporary_path_beside(path: str | os.PathLike[str]) -> Path:
    """A new, empty, hidden file in ``path``'s folder (created, with the folder if needed), for a
    writer that needs a file name; rename it over ``path`` when it is complete."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any], mode: int = 0o644) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it over ``path``.

    On any error (or interruption) the temporary file is removed and ``path`` is left as it was.
    ``mode`` sets the permission bits of the result (``mkstemp`` creates files readable by the
    owner only). Returns ``path``.
    """
    target = Path(path)
    tmp = temporary_path_beside(target)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) whole or not at all."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def atomic_write_json(path: str | os.PathLike[str], content: Any, **dump_kwargs: Any) -> Path:
    """Write ``content`` as indented JSON whole or not at all (``dump_kwargs`` go to ``json.dumps``)."""
    return atomic_write_text(path, json.dumps(content, **{"indent": 2, **dump_kwargs}) + "\n")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``None`` or ``"auto"`` picks CUDA, then MPS, then the CPU; an explicit
    device that this machine lacks is a ``ValueError`` that says what to use instead."""
    if device is None or device == "" or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: use cpu, cuda, cuda:N or mps (or auto)") from None
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r}: use cpu, cuda, cuda:N or mps (or auto)")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: PyTorch sees no CUDA GPU here; use --device cpu")
    if chosen.type == "mps" and not _mps_available():
        raise ValueError(f"--device {device}: Apple's MPS backend is not available here; use --device cpu")
    return chosen
