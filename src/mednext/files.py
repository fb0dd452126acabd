"""Writing files whole or not at all, choosing the device, running a chatty step quietly: one helper for each job.

Every file mednext writes (checkpoints, exports, predictions' JSON, evaluations, plots) goes
through :func:`atomic_write`: the content goes to a temporary file in the target's folder, is
flushed to disk, and is then renamed over the target, so an interrupted run never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mednext.errors import FolderBusyError, UnsafePathError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks
    fcntl = None

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "check_plain_name",
    "folder_lock",
    "inside",
    "remove_stale_temporaries",
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


def _umask() -> int:
    """The process's umask (read from /proc where it can be, without changing it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any], mode: int | None = None) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it over ``path``.

    On any error (or interruption) the temporary file is removed and ``path`` is left as it was
    (a kill -9 can leave the hidden temporary file; :func:`remove_stale_temporaries` removes it).
    ``mode`` sets the permission bits of the result; by default those of any new file under the
    user's umask (``mkstemp`` alone creates files readable by the owner only). Returns ``path``.
    """
    target = Path(path)
    tmp = temporary_path_beside(target)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            # a failed write (a full disk) does not say where: name the file it was for
            raise OSError(err.errno, err.strerror or str(err), str(target)) from err
        raise
    return target


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # temporary_path_beside's names (mkstemp: 8 characters)


def remove_stale_temporaries(folder: str | os.PathLike[str], prefixes: tuple[str, ...] = ()) -> list[Path]:
    """Remove what killed runs left in ``folder``: the hidden temporary files of :func:`atomic_write`
    and folders whose names start with one of ``prefixes``. Call it only while holding the folder's
    :func:`folder_lock`, so that no running writer's files are taken. Returns what was removed."""
    root = Path(folder)
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if p.is_file() and _TEMPORARY.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
        elif p.is_dir() and prefixes and p.name.startswith(prefixes):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


LOCK_NAME = ".mednext.lock"


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike[str], what: str, shared: bool = False, name: str = LOCK_NAME
) -> Iterator[Path]:
    """Hold ``folder``'s lock (created with the folder if needed) for the block: exclusive, or
    ``shared`` with other shared holders. Another process holding it in a conflicting way is a
    FolderBusyError naming the folder and that process's command. The lock goes with the process
    (a killed run leaves nothing to clean up); its file is removed by the last holder.
    ``what`` names the holder's command, e.g. ``"mednext plan"``; ``name`` is the lock file's name
    (another name is another lock on the same folder, e.g. one per part of a split prediction)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    path = root / check_plain_name(name, "lock file name")
    if fcntl is None:  # pragma: no cover - not POSIX: no locks
        yield root
        return
    handle = _acquire(path, shared)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what} (process {os.getpid()})")
        handle.flush()
        yield root
    finally:
        try:
            # the last holder removes the file; it still holds the lock while doing so, and a
            # process that opened the removed file notices (see _acquire) and takes the new one
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except BlockingIOError:
            pass  # other shared holders remain
        finally:
            handle.close()


def _acquire(path: Path, shared: bool) -> Any:
    while True:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held by folder_lock)
        try:
            fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another mednext command"
            handle.close()
            raise FolderBusyError(
                f"{path.parent} is in use by {holder}; wait until it has finished (or stop it), or use another folder"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()  # the file was removed by its last holder meanwhile: lock the new one


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) whole or not at all."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def atomic_write_json(path: str | os.PathLike[str], content: Any, **dump_kwargs: Any) -> Path:
    """Write ``content`` as indented JSON whole or not at all (``dump_kwargs`` go to ``json.dumps``)."""
    return atomic_write_text(path, json.dumps(content, **{"indent": 2, **dump_kwargs}) + "\n")


def run_quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with its standard output captured: a chatty engine step says nothing
    when it works, and the last 4,000 characters of what it printed are shown when it fails."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            return fn(*args, **kwargs)
    except BaseException:
        print(buffer.getvalue()[-4000:])
        raise


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
