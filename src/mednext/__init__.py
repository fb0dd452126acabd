"""mednext: the MedNeXt network (Roy et al., MICCAI 2023) and a pipeline to train and apply it."""

from mednext.nn import MedNeXt, create_mednext, load_pretrained, upkern
from mednext.version import __version__

__all__ = ["MedNeXt", "__version__", "create_mednext", "load_pretrained", "upkern"]
