"""The MedNeXt network layer: pure PyTorch, no other runtime dependency.

- :mod:`~mednext.nn.mednext`: :class:`MedNeXt`, the S/B/M/L presets and :func:`create_mednext`;
- :mod:`~mednext.nn.blocks`: the paper's blocks, GRN and the channels-first LayerNorm;
- :mod:`~mednext.nn.layers`: PyTorch's convolutions and group norm, choosing their kernel as they run;
- :mod:`~mednext.nn.kernels`: the kernels the layers choose between (CPU, polyphase, fused, Triton);
- :mod:`~mednext.nn.weights`: foreign layouts, our checkpoints, loading, transfer and UpKern;
- :mod:`~mednext.nn.export` (ONNX, TorchScript) and :mod:`~mednext.nn.summary` (sizes, MACs, memory).
"""

from mednext.nn.blocks import (
    ChannelsFirstLayerNorm,
    GlobalResponseNorm,
    MedNeXtBlock,
    MedNeXtDownBlock,
    MedNeXtOutBlock,
    MedNeXtUpBlock,
    global_response_norm,
)
from mednext.nn.export import example_input, export_model, run_exported
from mednext.nn.mednext import PRESETS, MedNeXt, create_mednext
from mednext.nn.weights import (
    load_checkpoint,
    load_pretrained,
    safe_torch_load,
    save_checkpoint,
    to_monai,
    to_reference_state_dict,
    transfer_weights,
    upkern,
)

__all__ = [
    "PRESETS",
    "ChannelsFirstLayerNorm",
    "GlobalResponseNorm",
    "MedNeXt",
    "MedNeXtBlock",
    "MedNeXtDownBlock",
    "MedNeXtOutBlock",
    "MedNeXtUpBlock",
    "create_mednext",
    "example_input",
    "export_model",
    "global_response_norm",
    "load_checkpoint",
    "load_pretrained",
    "run_exported",
    "safe_torch_load",
    "save_checkpoint",
    "to_monai",
    "to_reference_state_dict",
    "transfer_weights",
    "upkern",
]
