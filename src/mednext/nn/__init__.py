"""The MedNeXt network layer: pure PyTorch, no other runtime dependency."""

from mednext.nn.checkpoint import load_checkpoint, safe_torch_load, save_checkpoint
from mednext.nn.export import example_input, export_model, run_exported
from mednext.nn.mednext import (
    PRESETS,
    ChannelsFirstLayerNorm,
    GlobalResponseNorm,
    MedNeXt,
    MedNeXtBlock,
    MedNeXtDownBlock,
    MedNeXtOutBlock,
    MedNeXtUpBlock,
    create_mednext,
    global_response_norm,
)
from mednext.nn.upkern import upkern
from mednext.nn.weights import load_pretrained, to_monai, to_reference_state_dict, transfer_weights

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
