"""mednext: the MedNeXt network (Roy et al., MICCAI 2023) and a pipeline to train and apply it."""

from mednext.nn import MedNeXt, create_mednext, load_pretrained, upkern

__version__ = "0.1.0"
__all__ = ["MedNeXt", "__version__", "create_mednext", "load_pretrained", "upkern"]
