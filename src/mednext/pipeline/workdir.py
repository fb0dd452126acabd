"""The engine's environment: its three folders and its process settings, in one place.

``--workdir`` holds nnU-Net v2's three folders. Given, it wins over nnU-Net's own environment
variables (:class:`WorkDirs` says which of the user's values it replaced); not given, those
variables are used when set, else ``./mednext_work``. They are never required. nnunetv2 2.8 reads
them lazily (``nnunetv2.paths._EnvPath``), so setting them here, before any engine call, is enough.
The engine's trainer search (``nnUNet_extTrainer``) is pointed at MedNeXt's trainers as well
(:mod:`mednext.pipeline.engine_trainers`), so that the engine's own code finds them by name.

This module is the only one in mednext that reads or writes the engine's ``nnUNet_*`` variables;
everything else asks the functions below.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mednext.errors import DatasetError

DEFAULT_WORKDIR = Path("mednext_work")
_ENV = {"raw": "nnUNet_raw", "preprocessed": "nnUNet_preprocessed", "results": "nnUNet_results"}
_SET_HERE: dict[str, str] = {}  # variables this module set, so a later call may move them
# The engine's process settings (names as nnunetv2 spells them).
AUGMENTATION_WORKERS = "nnUNet_n_proc_DA"  # data-augmentation worker processes per GPU
DEFAULT_PROCESSES = "nnUNet_def_n_proc"  # processes for preprocessing
COMPILE = "nnUNet_compile"  # torch.compile the network in the engine's trainer


EXTERNAL_TRAINERS = "nnUNet_extTrainer"  # folders the engine searches for trainer classes by name
TRAINER_FOLDER = Path(__file__).resolve().parent / "engine_trainers"


@dataclass(frozen=True)
class WorkDirs:
    """The engine's three folders in use; ``replaced``: the user's ``nnUNet_*`` values that an
    explicit ``--workdir`` replaced (variable -> the user's value)."""

    raw: Path
    preprocessed: Path
    results: Path
    replaced: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the user when ``--workdir`` replaced some of their variables, else ''."""
        if not self.replaced:
            return ""
        named = ", ".join(f"{var}={value}" for var, value in self.replaced.items())
        return (
            f"using --workdir's folders ({self.raw.parent}); your environment's {named} "
            f"{'is' if len(self.replaced) == 1 else 'are'} not used by this command"
        )


def use_workdir(workdir: str | os.PathLike | None = None) -> WorkDirs:
    """Point the engine at ``workdir``'s subfolders, create them, and return the folders in use.

    ``workdir`` given: its folders, whatever the environment says. None: nnU-Net's variables
    where the user set them, else ``./mednext_work``'s folders. Either way the engine's trainer
    search also looks in :data:`TRAINER_FOLDER`."""
    root = Path(workdir) if workdir is not None else DEFAULT_WORKDIR
    folders: dict[str, Path] = {}
    replaced = {}
    for key, var in _ENV.items():
        value = os.environ.get(var)
        user_set = bool(value) and _SET_HERE.get(var) != value
        mine = (root / var).absolute()
        use_users = user_set and workdir is None
        path = Path(value) if use_users else mine
        if user_set and not use_users and Path(value).absolute() != mine:
            replaced[var] = value
        path.mkdir(parents=True, exist_ok=True)
        if not use_users:
            os.environ[var] = _SET_HERE[var] = str(path)
        folders[key] = path
    _add_trainer_folder()
    return WorkDirs(**folders, replaced=replaced)


def _add_trainer_folder() -> None:
    present = [p for p in os.environ.get(EXTERNAL_TRAINERS, "").split(os.pathsep) if p]
    if str(TRAINER_FOLDER) not in present:
        os.environ[EXTERNAL_TRAINERS] = os.pathsep.join([*present, str(TRAINER_FOLDER)])


def engine_environment(workdir: str | os.PathLike | None = None) -> dict[str, str]:
    """The variables with which nnU-Net's own ``nnUNetv2_*`` commands use the same folders as
    ``mednext ... --workdir workdir`` and find MedNeXt's trainers (``mednext env`` prints them)."""
    dirs = use_workdir(workdir)
    return {
        "nnUNet_raw": str(dirs.raw),
        "nnUNet_preprocessed": str(dirs.preprocessed),
        "nnUNet_results": str(dirs.results),
        EXTERNAL_TRAINERS: os.environ[EXTERNAL_TRAINERS],
    }


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
