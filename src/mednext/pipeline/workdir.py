"""The engine's environment: its three folders and its process settings, in one place.

``--workdir`` (default ``./mednext_work``) holds nnU-Net v2's three folders. nnU-Net's own
environment variables win when they are set; they are never required. nnunetv2 2.8.1 reads them
lazily (``nnunetv2.paths._EnvPath``), so setting them here, before any engine call, is enough.

This module is the only one in mednext that reads or writes the engine's ``nnUNet_*`` variables;
everything else asks the functions below.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mednext.errors import DatasetError

DEFAULT_WORKDIR = Path("mednext_work")
_ENV = {"raw": "nnUNet_raw", "preprocessed": "nnUNet_preprocessed", "results": "nnUNet_results"}
_SET_HERE: dict[str, str] = {}  # variables this module set, so a later call may move them
# The engine's process settings (names as nnunetv2 spells them).
AUGMENTATION_WORKERS = "nnUNet_n_proc_DA"  # data-augmentation worker processes per GPU
DEFAULT_PROCESSES = "nnUNet_def_n_proc"  # processes for preprocessing
COMPILE = "nnUNet_compile"  # torch.compile the network in the engine's trainer


@dataclass(frozen=True)
class WorkDirs:
    raw: Path
    preprocessed: Path
    results: Path


def use_workdir(workdir: str | os.PathLike | None = None) -> WorkDirs:
    """Point the engine at ``workdir``'s subfolders (unless nnU-Net's variables are already set),
    create them, and return the three folders in use."""
    root = Path(workdir) if workdir is not None else DEFAULT_WORKDIR
    folders = {}
    for key, var in _ENV.items():
        value = os.environ.get(var)
        user_set = bool(value) and _SET_HERE.get(var) != value
        path = Path(value) if user_set else (root / var).absolute()
        path.mkdir(parents=True, exist_ok=True)
        if not user_set:
            os.environ[var] = _SET_HERE[var] = str(path)
        folders[key] = path
    return WorkDirs(**folders)


def _folder(key: str) -> Path:
    value = os.environ.get(_ENV[key])
    if not value:
        raise DatasetError(
            f"{_ENV[key]} is not set: call mednext.pipeline.workdir.use_workdir(WORKDIR) first "
            "(the mednext commands do this from --workdir)"
        )
    return Path(value)


def raw_folder() -> Path:
    """The engine's raw-dataset folder (``nnUNet_raw``) in use."""
    return _folder("raw")


def preprocessed_folder() -> Path:
    """The engine's preprocessed-data folder (``nnUNet_preprocessed``) in use."""
    return _folder("preprocessed")


def results_folder() -> Path:
    """The engine's results folder (``nnUNet_results``) in use."""
    return _folder("results")


def augmentation_workers() -> int | None:
    """The data-augmentation worker processes the user asked the engine for, or None if unset."""
    value = os.environ.get(AUGMENTATION_WORKERS)
    return int(value) if value not in (None, "") else None


@contextlib.contextmanager
def engine_setting(name: str, value: str | int | None) -> Iterator[None]:
    """Set the engine's process variable ``name`` to ``value`` for a ``with`` block and restore the
    user's value (or its absence) afterwards; ``value=None`` leaves it as it is."""
    if name not in (AUGMENTATION_WORKERS, DEFAULT_PROCESSES, COMPILE):
        raise ValueError(f"{name!r} is not an engine process setting mednext changes")
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = str(value)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def default_processes() -> int:
    """Processes for preprocessing: the engine's ``nnUNet_def_n_proc`` if set, else up to 8 cores."""
    value = os.environ.get(DEFAULT_PROCESSES)
    return int(value) if value else max(1, min(8, os.cpu_count() or 1))


def compile_requested() -> bool:
    """Whether the user asked the engine to ``torch.compile`` the network (``nnUNet_compile=1``)."""
    return os.environ.get(COMPILE, "0").lower() in ("1", "true", "t")
