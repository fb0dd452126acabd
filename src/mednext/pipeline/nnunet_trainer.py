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
  ``weights_only=True`` (the engine's own ``load_checkpoint`` unpickles whatever the file holds).
"""

from __future__ import annotations

from typing import Any

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo import OptimizedModule

from mednext.files import atomic_write
from mednext.nn import safe_torch_load
from mednext.pipeline.trainer import EpochLoop, plain_values


class nnUNetTrainer_budget(EpochLoop, nnUNetTrainer):  # noqa: N801 (nnU-Net's trainer naming)
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

    def unwrapped_network(self) -> torch.nn.Module:
        """The network without its DDP and ``torch.compile`` wrappers."""
        module = self.network.module if self.is_ddp else self.network
        return module._orig_mod if isinstance(module, OptimizedModule) else module

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.unwrapped_network().state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": plain_values(self.logger.get_checkpoint()),
            "_best_ema": plain_values(self._best_ema),
            "current_epoch": self.current_epoch + 1,
            "init_args": plain_values(self.my_init_kwargs),
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": plain_values(self.inference_allowed_mirroring_axes),
            "mednext": {
                "num_epochs": self.num_epochs,
                "iterations_per_epoch": self.num_iterations_per_epoch,
                "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
            },
        }
        atomic_write(filename, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """The engine's ``load_checkpoint``, reading the file with ``weights_only=True`` (the engine's
        unpickles it, and with a dict instead of a path its 2.8.1 fails before reading it)."""
        if not self.was_initialized:
            self.initialize()
        checkpoint: Any = filename_or_checkpoint
        if not isinstance(checkpoint, dict):
            checkpoint = safe_torch_load(filename_or_checkpoint)
        if checkpoint.get("trainer_name") != self.__class__.__name__:
            raise ValueError(
                f"checkpoint was written by {checkpoint.get('trainer_name')}, not {self.__class__.__name__}"
            )
        weights = {k.removeprefix("module."): v for k, v in checkpoint["network_weights"].items()}
        self.unwrapped_network().load_state_dict(weights)
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        if checkpoint.get("inference_allowed_mirroring_axes") is not None:
            self.inference_allowed_mirroring_axes = tuple(checkpoint["inference_allowed_mirroring_axes"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
