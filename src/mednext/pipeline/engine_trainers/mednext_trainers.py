"""MedNeXt's trainers under their names, for nnU-Net's trainer search (``nnUNet_extTrainer``).

The engine imports this module from its folder and asks it for a class by name; the classes are
those of :mod:`mednext.pipeline.trainer` (the same objects, not copies), including those of other
odd kernels (``MedNeXtTrainer_Sk7``), made on first use by ``get_trainer_class``, and the engine's own
trainer in mednext's epoch loop that ``mednext compare`` trains (``nnUNetTrainer_budget``).
"""

from __future__ import annotations

from mednext.pipeline.nnunet_trainer import nnUNetTrainer_budget
from mednext.pipeline.trainer import TRAINERS, get_trainer_class, parse_trainer_name


def __getattr__(name: str) -> type:
    if name == nnUNetTrainer_budget.__name__:
        return nnUNetTrainer_budget
    if name in TRAINERS:
        return TRAINERS[name]
    parsed = parse_trainer_name(name)
    if parsed is not None and parsed[1] % 2 == 1:
        return get_trainer_class(*parsed)
    raise AttributeError(name)


def __dir__() -> list[str]:
    return sorted([*TRAINERS, nnUNetTrainer_budget.__name__])
