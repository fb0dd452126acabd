"""Neighbouring slices as extra input channels ("2.5D") for 2D configurations.

A 2D network sees one slice; with ``k`` context slices it sees slice ``z`` and the ``k`` slices on
either side of it, stacked as ``2k + 1`` input channels per image channel, and still predicts slice
``z`` alone. The cost of a training step barely changes (only the stem convolution sees more
channels), while the network gets the through-plane context that tells, for example, a spleen from
a kidney whose cross-sections look alike.

The same stacking serves training and prediction, so both see identical inputs:

* :func:`stack_neighbour_slices` turns a ``(c, z, y, x)`` volume into ``(c * (2k + 1), z, y, x)``:
  channel ``i * (2k + 1) + j`` holds image channel ``i`` shifted by ``j - k`` slices, zero (the
  normalised mean) beyond the volume's first and last slice.
* Training: :func:`context_dataset_class` wraps the engine's dataset class so that ``load_case``
  returns the stacked volume; the engine's 2D data loader then crops one slice, which now carries
  its neighbours as channels. :func:`synchronise_channels` makes the engine's intensity
  augmentations treat the stacked channels alike (one brightness, contrast, gamma, noise level per
  sample), as they are one image.
* Prediction: :func:`mednext.pipeline.predictor.predict_case` stacks the preprocessed volume the same
  way before the sliding window runs over it slice by slice.

The number of context slices is stored in the plans' configuration under :data:`CONTEXT_KEY`, which
the trainer writes into the plans it copies to the results folder; ``mednext predict`` reads it from
there (:func:`context_slices_of`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mednext.pipeline.datasets import TransformedDatasetClass

CONTEXT_KEY = "mednext_context_slices"


def context_slices_of(configuration: Mapping[str, Any]) -> int:
    """The number of context slices on each side that a plans configuration asks for (0: plain 2D)."""
    value = configuration.get(CONTEXT_KEY, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"plans entry {CONTEXT_KEY}={value!r}: expected a non-negative integer")
    return value


def check_context_slices(context_slices: int, patch_size: Any) -> int:
    """Validate ``context_slices`` for a configuration with ``patch_size``; return it as an int."""
    if not isinstance(context_slices, int) or isinstance(context_slices, bool) or context_slices < 0:
        raise ValueError(f"context_slices must be a non-negative integer, got {context_slices!r}")
    if context_slices and len(patch_size) != 2:
        raise ValueError(
            f"context_slices={context_slices} needs a 2D configuration (patch {list(patch_size)} is "
            f"{len(patch_size)}D): neighbouring slices become input channels of a 2D network"
        )
    return context_slices


def stack_neighbour_slices(data: np.ndarray | torch.Tensor, k: int) -> np.ndarray | torch.Tensor:
    """``(c, z, *plane)`` -> ``(c * (2k + 1), z, *plane)``: each slice with its ``k`` neighbours on
    either side as channels (zeros beyond the first and last slice). ``k == 0`` returns ``data``."""
    if k == 0:
        return data
    if data.ndim < 3:
        raise ValueError(f"expected (channels, slices, ...) data, got shape {tuple(data.shape)}")
    c, z = data.shape[0], data.shape[1]
    if isinstance(data, torch.Tensor):
        out = torch.zeros((c, 2 * k + 1, *data.shape[1:]), dtype=data.dtype, device=data.device)
    else:
        data = np.asarray(data)
        out = np.zeros((c, 2 * k + 1, *data.shape[1:]), dtype=data.dtype)
    for j in range(2 * k + 1):
        shift = j - k  # this channel of slice s shows slice s + shift
        lo, hi = max(0, -shift), min(z, z - shift)
        if lo < hi:
            out[:, j, lo:hi] = data[:, lo + shift : hi + shift]
    return out.reshape(c * (2 * k + 1), *data.shape[1:])


class StackNeighbours:
    """A case transform (:data:`~mednext.pipeline.datasets.CaseTransform`) that stacks each slice's
    ``context_slices`` neighbours on either side as channels."""

    def __init__(self, context_slices: int) -> None:
        self.context_slices = context_slices

    def __call__(self, data: Any, seg: Any, seg_prev: Any, properties: dict) -> tuple:
        return stack_neighbour_slices(np.asarray(data), self.context_slices), seg, seg_prev, properties

    def __repr__(self) -> str:
        return f"StackNeighbours({self.context_slices})"


def context_dataset_class(base: Any, k: int) -> Any:
    """The engine's dataset class ``base``, or with ``k`` context slices a stand-in for it whose cases
    come with stacked neighbours."""
    if k == 0:
        return base
    return TransformedDatasetClass(base, StackNeighbours(k))


def synchronise_channels(transform: Any) -> Any:
    """Make every intensity augmentation inside ``transform`` (the engine's composed transforms) draw
    one value per sample for all channels and apply it to all of them. Changes ``transform`` in place
    and returns it."""
    stack = [transform]
    while stack:
        t = stack.pop()
        if hasattr(t, "synchronize_channels"):
            t.synchronize_channels = True
        if hasattr(t, "p_per_channel"):
            t.p_per_channel = 1.0
        for attr in ("transforms", "transform"):
            inner = getattr(t, attr, None)
            if isinstance(inner, (list, tuple)):
                stack.extend(inner)
            elif inner is not None:
                stack.append(inner)
    return transform
