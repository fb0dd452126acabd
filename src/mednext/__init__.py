"""mednext: the MedNeXt network (Roy et al., MICCAI 2023) and a pipeline to train and apply it.

``import mednext`` loads the network layer only (torch). :class:`Segmenter`, a trained model for
notebooks (:mod:`mednext.pipeline.segmenter`), is imported on first use of ``mednext.Segmenter``,
as it needs the pipeline's dependencies (the ``pipeline`` extra: ``pip install ".[pipeline]"`` in a checkout).
"""

from typing import Any

from mednext.nn import MedNeXt, create_mednext, load_pretrained, upkern
from mednext.version import __version__

__all__ = ["MedNeXt", "__version__", "create_mednext", "load_pretrained", "upkern"]


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        try:
            from mednext.pipeline.segmenter import Segmenter
        except ModuleNotFoundError as err:
            raise ImportError(
                f"mednext.Segmenter needs the pipeline's dependencies ({err.name} is missing): "
                'install the "pipeline" extra (pip install ".[pipeline]" in a checkout of mednext)'
            ) from err
        return Segmenter
    raise AttributeError(f"module 'mednext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "Segmenter"])
