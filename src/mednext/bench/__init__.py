"""What ``mednext benchmark`` measures: our MedNeXt side by side with its peers, same weights, one run.

An optional part of the package. It needs MONAI (the peer network), which mednext itself does not
install: ``pip install "mednext[bench]"``. Without it, :func:`require_monai` raises a
:class:`~mednext.errors.UserError` that says so.

- :mod:`mednext.bench.step`: a training step and an inference forward of our network against
  MONAI's ``MedNeXt`` (as shipped and in channels-last), on the CPU or a GPU.
- :mod:`mednext.bench.predict`: a whole CT volume predicted by ``mednext predict`` and by the
  engine's stock ``nnUNetPredictor`` holding MONAI's network (time, peak memory, agreement); it
  also needs the ``pipeline`` extra, which ``bench`` includes.

This layer sits above :mod:`mednext.demo` and below :mod:`mednext.cli`; nothing else in the
package imports it. Tables in ``docs/benchmarks.md`` come from here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType

from mednext.errors import UserError

__all__ = ["INSTALL_HINT", "monai_name", "require_monai"]

INSTALL_HINT = 'pip install "mednext[bench]"'


def require_monai() -> ModuleType:
    """MONAI's MedNeXt module (``monai.networks.nets.mednext``: ``MedNeXt``, ``create_mednext``).

    Raises:
        UserError: MONAI (with its MedNeXt) is not installed; the message names the extra to install.
    """
    try:
        return importlib.import_module("monai.networks.nets.mednext")
    except ImportError as err:
        raise UserError(
            f"mednext benchmark compares against MONAI's MedNeXt, and MONAI is not installed here ({err}). "
            f"Install the benchmark extra: {INSTALL_HINT}"
        ) from err


def monai_name() -> str:
    """``"MONAI <installed version>"``, for table labels (found without importing MONAI)."""
    try:
        return f"MONAI {importlib.metadata.version('monai')}"
    except importlib.metadata.PackageNotFoundError:
        return "MONAI (not installed)"
