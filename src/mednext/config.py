"""Every process-wide switch of mednext, in one place.

The ``MEDNEXT_*`` environment variables are read once, on first use, into a :class:`Settings`
value; code asks :func:`get` for it and never reads the environment itself. Setters change one
switch for the rest of the process, :func:`override` changes some for a ``with`` block.

=============================== ======================================================== =========
variable                        switch                                                   default
=============================== ======================================================== =========
``MEDNEXT_FAST_PATH``           ``fast_path``: 3D networks built from now on run the      ``1``
                                channels-last fast path (``0``: the plain path)
``MEDNEXT_FUSED_BLOCKS``        ``fused_blocks``: the CPU fast path fuses each block's    ``1``
                                norm, expansion, GELU and compression
``MEDNEXT_KEEP_FREED_MEMORY``   ``keep_freed_memory``: training and prediction on the     ``1``
                                CPU keep freed memory in the process
``MEDNEXT_CUDA_ROUTE``          ``cuda_route``: ``plain``, ``channels_last`` or          ``triton``
                                ``triton`` (see :class:`CudaRoute`)                       if installed
``MEDNEXT_CACHE``               ``cache_dir``: where the demo's example scans are kept    ``~/.cache/mednext``
=============================== ======================================================== =========

Layers read a switch when they run (a network built before a change follows it, except
``fast_path``, which a network copies when it is built, as ``MedNeXt.set_fast_path`` overrides).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mednext.errors import ConfigError

__all__ = [
    "CudaRoute",
    "Settings",
    "from_environment",
    "get",
    "override",
    "reload",
    "set_cuda_route",
    "set_fast_path",
    "set_force_cuda_route",
    "set_fused_blocks",
    "set_keep_freed_memory",
]

_ROUTE_CHOICES = {
    "layout": ("plain", "channels_last"),
    "depthwise": ("native", "triton"),
    "up": ("native", "polyphase"),
    "down": ("native", "polyphase"),
    "norm": ("native", "manual", "triton"),
    "dw_weights": ("float32", "autocast"),
}


@dataclass(frozen=True)
class CudaRoute:
    """How the fast path runs on CUDA, part by part.

    Attributes:
        layout: ``"channels_last"`` keeps activations channels-last on CUDA (the parts below
            apply); ``"plain"`` runs the plain NCDHW path.
        depthwise: ``"triton"`` runs the depthwise convolutions through mednext's Triton kernels,
            ``"native"`` through PyTorch's.
        up: ``"polyphase"`` writes the transposed depthwise conv as stride-1 convs of sub-kernels.
        down: ``"polyphase"`` does the same for the strided depthwise conv.
        norm: ``"manual"`` (a channels-last group norm in PyTorch ops), ``"native"`` (PyTorch's,
            copied back to channels-last) or ``"triton"`` (mednext's Triton group norm).
        dw_weights: ``"float32"`` hands the Triton depthwise kernels the float32 weights under
            autocast; ``"autocast"`` casts them as PyTorch's convolutions do.
    """

    layout: str = "plain"
    depthwise: str = "native"
    up: str = "polyphase"
    down: str = "native"
    norm: str = "manual"
    dw_weights: str = "float32"

    def __post_init__(self) -> None:
        for part, choices in _ROUTE_CHOICES.items():
            value = getattr(self, part)
            if value not in choices:
                raise ConfigError(f"cuda_route.{part}={value!r} is not supported; use one of {', '.join(choices)}")

    @classmethod
    def named(cls, name: str) -> CudaRoute:
        """The route that ``MEDNEXT_CUDA_ROUTE=name`` selects."""
        if name == "plain":
            return cls()
        if name == "channels_last":
            return cls(layout="channels_last")
        if name == "triton":
            return cls(layout="channels_last", depthwise="triton")
        raise ConfigError(
            f"MEDNEXT_CUDA_ROUTE={name!r} is not supported; use plain, channels_last or triton "
            "(or unset it for the default)"
        )


def _default_route_name() -> str:
    # Triton ships with CUDA builds of PyTorch; without it the plain layout is the faster one.
    return "triton" if importlib.util.find_spec("triton") is not None else "plain"


def _default_cache_dir(environ: Mapping[str, str]) -> Path:
    xdg = environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mednext"


@dataclass(frozen=True)
class Settings:
    """The switches in force (see the module's table for their variables)."""

    fast_path: bool = True
    fused_blocks: bool = True
    keep_freed_memory: bool = True
    cuda_route: CudaRoute = field(default_factory=CudaRoute)
    # Run the CUDA route's code on CPU tensors: tests check its arithmetic without a GPU.
    force_cuda_route: bool = False
    cache_dir: Path = field(default_factory=lambda: _default_cache_dir(os.environ))


def _flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={environ[name]!r} is not understood; use 1 (on) or 0 (off)")


def from_environment(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings that ``environ`` (default: this process's environment) asks for; a
    :class:`~mednext.errors.ConfigError` names a variable whose value is not understood."""
    env = os.environ if environ is None else environ
    cache = env.get("MEDNEXT_CACHE")
    return Settings(
        fast_path=_flag(env, "MEDNEXT_FAST_PATH"),
        fused_blocks=_flag(env, "MEDNEXT_FUSED_BLOCKS"),
        keep_freed_memory=_flag(env, "MEDNEXT_KEEP_FREED_MEMORY"),
        cuda_route=CudaRoute.named(env.get("MEDNEXT_CUDA_ROUTE") or _default_route_name()),
        cache_dir=Path(cache).expanduser() if cache else _default_cache_dir(env),
    )


_LOCK = threading.RLock()
_CURRENT: list[Settings] = []  # empty until first use


def get() -> Settings:
    """The settings in force; the environment is read on the first call."""
    current = _CURRENT
    if current:
        # Read without the lock (layers ask once per call, and torch.compile cannot trace a lock): the
        # list is only changed under the lock, by single assignments, and emptied only by a failed reload.
        return current[0]
    with _LOCK:
        if not _CURRENT:
            _CURRENT.append(from_environment())
        return _CURRENT[0]


def _replace(**changes: Any) -> Settings:
    with _LOCK:
        new = dataclasses.replace(get(), **changes)
        _CURRENT[0] = new
        return new


def reload() -> Settings:
    """Read the environment again, dropping every setter's change (for tests and notebooks)."""
    with _LOCK:
        try:
            settings = from_environment()
        except BaseException:
            _CURRENT.clear()  # the next get() reads the environment again, and fails the same way
            raise
        _CURRENT[:] = [settings]
        return settings


def set_fast_path(enable: bool = True) -> None:
    """Default fast path for 3D networks built from now on."""
    _replace(fast_path=bool(enable))


def set_fused_blocks(enable: bool = True) -> None:
    """Fuse each block's norm, expansion, GELU and compression on the CPU fast path."""
    _replace(fused_blocks=bool(enable))


def set_keep_freed_memory(enable: bool = True) -> None:
    """Keep freed memory in the process while training and predicting on the CPU."""
    _replace(keep_freed_memory=bool(enable))


def set_cuda_route(route: str | CudaRoute | None = None, **parts: str) -> None:
    """Choose the CUDA route by name (``"plain"``, ``"channels_last"``, ``"triton"``), as a
    :class:`CudaRoute`, or change some of its parts: ``set_cuda_route(norm="triton")``."""
    with _LOCK:
        base = get().cuda_route if route is None else route
        if isinstance(base, str):
            base = CudaRoute.named(base)
        _replace(cuda_route=dataclasses.replace(base, **parts))


def set_force_cuda_route(enable: bool = True) -> None:
    """Run the CUDA route's code on CPU tensors (tests of its arithmetic without a GPU)."""
    _replace(force_cuda_route=bool(enable))


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """Change switches for a ``with`` block and restore the previous settings on leaving it:
    ``with config.override(fast_path=False): ...``. ``cuda_route`` takes a name, a
    :class:`CudaRoute` or a dict of parts."""
    with _LOCK:
        previous = get()
        route = changes.get("cuda_route")
        if isinstance(route, str):
            changes["cuda_route"] = CudaRoute.named(route)
        elif isinstance(route, Mapping):
            changes["cuda_route"] = dataclasses.replace(previous.cuda_route, **route)
        if "cache_dir" in changes:
            changes["cache_dir"] = Path(changes["cache_dir"])
        current = _replace(**changes)
    try:
        yield current
    finally:
        with _LOCK:
            _CURRENT[0] = previous
