"""Weights that move: foreign layouts, our checkpoint format, loading, fine-tuning transfer and UpKern.

- :mod:`~mednext.nn.weights.layouts`: reference (nnU-Net v1) and MONAI state dicts in mednext names
  and back, and the network's arguments inferred from a state dict (pure state-dict functions);
- :mod:`~mednext.nn.weights.checkpoint`: our safetensors format and the one loader of pickled files
  (:func:`safe_torch_load`, which never runs pickled code);
- :mod:`~mednext.nn.weights.transfer`: :func:`load_pretrained` from any of these, and
  :func:`transfer_weights` / :func:`inflate_2d_to_3d` into a model of another shape;
- :mod:`~mednext.nn.weights.upkern`: UpKern, a large-kernel model from a small-kernel one.
"""

from mednext.errors import LayoutError, ShapeMismatchError
from mednext.nn.weights.checkpoint import (
    load_checkpoint,
    load_state_dict_exact,
    safe_torch_load,
    save_checkpoint,
)
from mednext.nn.weights.layouts import LoadReport, convert_state_dict, infer_config, to_monai, to_reference_state_dict
from mednext.nn.weights.transfer import (
    TransferReport,
    inflate_2d_to_3d,
    load_pretrained,
    read_source,
    transfer_weights,
)
from mednext.nn.weights.upkern import upkern, upkern_state_dict

__all__ = [
    "LayoutError",
    "LoadReport",
    "ShapeMismatchError",
    "TransferReport",
    "convert_state_dict",
    "infer_config",
    "inflate_2d_to_3d",
    "load_checkpoint",
    "load_pretrained",
    "load_state_dict_exact",
    "read_source",
    "safe_torch_load",
    "save_checkpoint",
    "to_monai",
    "to_reference_state_dict",
    "transfer_weights",
    "upkern",
    "upkern_state_dict",
]
