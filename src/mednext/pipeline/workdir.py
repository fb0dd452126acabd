"""Working folders: ``--workdir`` (default ``./mednext_work``) holds nnU-Net v2's three folders.

nnU-Net's own environment variables win when they are set; they are never required.
nnunetv2 2.8.1 reads them lazily (``nnunetv2.paths._EnvPath``), so setting them here, before
any engine call, is enough.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKDIR = Path("mednext_work")
_ENV = {"raw": "nnUNet_raw", "preprocessed": "nnUNet_preprocessed", "results": "nnUNet_results"}
_SET_HERE: dict[str, str] = {}  # variables this module set, so a later call may move them


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
