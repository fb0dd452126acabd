"""nnU-Net's own trainer, run the way mednext runs MedNeXt's, for side-by-side comparisons.

:class:`nnUNetTrainer_budget` is the engine's ``nnUNetTrainer``: its network (whatever the plans name:
the default U-Net of ``nnUNetPlans``, the residual-encoder U-Net of ``nnUNetResEncUNet*Plans``), its
loss, optimiser, learning-rate schedule, augmentation and validation, untouched. What it takes from
mednext is what a fair comparison needs to be the same for both models:

* the epoch loop (:class:`~mednext.pipeline.trainer.EpochLoop`): a run length in epochs or a
  wall-clock budget, a progress bar with the time left, the CPU memory policy; the engine's messages
  go to its log file only;
* :meth:`configure_run`, so :func:`mednext.pipeline.runner.train` trains it like a MedNeXt trainer
  (``--c``-style resumption included);
* checkpoints written every epoch, atomically, with plain values only, and read back with
  ``weights_only=True`` (:class:`~mednext.pipeline.trainer.PlainCheckpoints`; the engine's own
  ``load_checkpoint`` unpickles whatever the file holds).
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from mednext.pipeline.trainer import EpochLoop, PlainCheckpoints


class nnUNetTrainer_budget(EpochLoop, PlainCheckpoints, nnUNetTrainer):  # noqa: N801 (nnU-Net's trainer naming)
    """The engine's ``nnUNetTrainer`` and recipe in mednext's epoch loop (see the module docstring)."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int | str,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (the engine's signature)
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1  # an interrupted run loses at most one epoch
        self.show_progress = True

    def configure_run(
        self,
        epochs: int | None = None,
        iters_per_epoch: int | None = None,
        val_iters: int | None = None,
        bf16: bool = False,
        show_progress: bool = True,
        context_slices: int | None = None,
        compile: bool = False,
    ) -> None:
        """Set the run's length and progress bar before ``initialize`` (the signature of
        :meth:`mednext.pipeline.trainer.MedNeXtTrainer.configure_run`). Precision and compilation stay
        the engine's (float16 autocast on CUDA; ``nnUNet_compile``); context slices are MedNeXt's."""
        if self.was_initialized:
            raise RuntimeError("configure_run must be called before initialize()")
        for name, value in (("epochs", epochs), ("iters_per_epoch", iters_per_epoch), ("val_iters", val_iters)):
            if value is not None and (not isinstance(value, int) or value < (0 if name == "val_iters" else 1)):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if bf16 or compile or context_slices:
            raise ValueError(
                "nnU-Net's trainer keeps its own precision and compilation and has no context slices; "
                "drop --bf16/--compile/context slices for it"
            )
        if epochs is not None:
            self.num_epochs = epochs
        if iters_per_epoch is not None:
            self.num_iterations_per_epoch = iters_per_epoch
        if val_iters is not None:
            self.num_val_iterations_per_epoch = val_iters
        self.show_progress = show_progress

    def print_to_log_file(self, *args: object, also_print_to_console: bool = True, add_timestamp: bool = True) -> None:
        # the engine's log file keeps everything; the terminal gets the progress bar and its caller's lines
        super().print_to_log_file(*args, also_print_to_console=False, add_timestamp=add_timestamp)
