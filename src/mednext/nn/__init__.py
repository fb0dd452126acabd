"""The MedNeXt network layer: pure PyTorch, no other runtime dependency."""

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
from mednext.nn.weights import load_pretrained, transfer_weights

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
    "global_response_norm",
    "load_pretrained",
    "transfer_weights",
    "upkern",
]
