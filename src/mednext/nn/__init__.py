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
]
