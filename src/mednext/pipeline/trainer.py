"""The MedNeXt trainer: a narrow subclass of nnU-Net v2's ``nnUNetTrainer`` with the reference recipe.

What differs from the engine's trainer, and nothing else:

* network: :class:`mednext.nn.MedNeXt`, preset and kernel from the class (``MedNeXtTrainer_Sk3`` ...
  ``MedNeXtTrainer_Lk5``, and MedNeXt-v2's ``MedNeXtTrainer_V2Basek3`` and ``MedNeXtTrainer_V2Widek3``,
  trained with the same recipe); the plans handed to the engine (and copied to the results folder)
  describe exactly that network;
* optimiser: AdamW, lr 1e-3, weight decay 3e-5, eps 1e-4, poly decay (0.9) per epoch; gradient
  clipping at norm 12;
* loss: Dice (batch Dice, background excluded) + cross-entropy on all five deep-supervision outputs,
  weights 1, 1/2, 1/4, 1/8, 1/16 normalised to sum 1; for region-based label sets (BraTS-style
  ``regions_class_order`` datasets) Dice on each region's sigmoid + binary cross-entropy, as the engine;
* precision: float16 autocast with gradient scaling on CUDA, bfloat16 autocast without scaling when
  ``bf16`` is set, float32 elsewhere;
* DDP: the process's local rank picks the GPU (the engine uses the global rank); gloo on CPU;
* ``torch.compile`` only when the user asks for it (``--compile`` or ``nnUNet_compile=1``) and only on
  CUDA (on the CPU the compiled step is slower than the eager one: docs/benchmarks.md);
* checkpoints: written every epoch whole or not at all, with plain Python values only so that
  ``torch.load(..., weights_only=True)`` reads them; a JSON log per epoch; a progress bar.

The epoch loop is :class:`EpochLoop`, shared with the demo's trainers and with the engine's own
trainer as ``mednext compare`` runs it (:mod:`mednext.pipeline.nnunet_trainer`): the engine's hooks
in the engine's order, plus a progress bar, the CPU memory policy, an optional wall-clock budget and
one hook after each epoch (:meth:`EpochLoop.after_epoch`) that may change how many epochs are left.

Engine names that are private but still overridden here (no public hook exists):
``_get_deep_supervision_scales``, because the engine derives the scales from its U-Net's stride list
(stem first, last output unused) in ``get_dataloaders`` and MedNeXt's five outputs need others.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mednext.files import atomic_write, atomic_write_text
from mednext.memory import keeps_freed_memory, reuse_freed_memory
from mednext.nn import MedNeXt, safe_torch_load
from mednext.pipeline.context import CONTEXT_KEY, check_context_slices, context_dataset_class, synchronise_channels
from mednext.pipeline.ddp import local_rank_from_env, replica_max_abs_diff
from mednext.pipeline.planning import architecture_entry, mednext_arch_kwargs
from mednext.pipeline.workdir import compile_requested

PRESETS = ("S", "B", "M", "L", "V2-BASE", "V2-WIDE")
KERNELS = (3, 5)
# A preset's part of a trainer class name (a Python identifier, as nnU-Net finds trainers by name).
CLASS_TOKENS = {"S": "S", "B": "B", "M": "M", "L": "L", "V2-BASE": "V2Base", "V2-WIDE": "V2Wide"}
DS_WEIGHTS = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16)  # full resolution first, as the reference
LOG_NAME = "training_log.json"


def trainer_class_name(preset: str, kernel: int) -> str:
    """``MedNeXtTrainer_Sk3`` ... ``MedNeXtTrainer_V2Basek3``."""
    key = preset.upper()
    return f"MedNeXtTrainer_{CLASS_TOKENS.get(key, key)}k{int(kernel)}"


def parse_trainer_name(name: str) -> tuple[str, int] | None:
    """(preset, kernel) of a MedNeXt trainer name (``MedNeXtTrainer_V2Basek3`` -> ``("V2-BASE", 3)``),
    or None if ``name`` is not one."""
    match = re.match(r"^MedNeXtTrainer_([A-Za-z0-9]+)k(\d+)$", name)
    presets = {token: preset for preset, token in CLASS_TOKENS.items()}
    if match is None or match.group(1) not in presets:
        return None
    return presets[match.group(1)], int(match.group(2))


def plain_values(value: Any) -> Any:
    """Numpy scalars/arrays, tuples and devices as plain Python values (for weights_only loading)."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, (str, int)) else k: plain_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_values(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_values(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.device):
        return str(value)
    return value


def _json_safe(value: Any) -> Any:
    value = plain_values(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def with_mednext_architecture(plans: dict, configuration: str, preset: str, kernel: int) -> dict:
    """A copy of ``plans`` whose ``configuration`` names the MedNeXt ``preset``/``kernel`` with the
    planned stage strides (the plans from ``mednext plan`` carry a default S k3 network)."""
    plans = json.loads(json.dumps(plans))  # deep copy, plain types
    configs = plans.get("configurations", {})
    if configuration not in configs:
        raise ValueError(
            f"configuration {configuration!r} is not in plans {plans.get('plans_name')!r} (it has "
            f"{', '.join(configs)}); run 'mednext plan' with --configs {configuration}"
        )
    cfg = configs[configuration]
    arch = cfg.get("architecture", {})
    if arch.get("network_class_name") != "mednext.nn.MedNeXt":
        raise ValueError(
            f"plans {plans.get('plans_name')!r} configuration {configuration!r} was not made by 'mednext plan' "
            f"(network {arch.get('network_class_name')!r}); run 'mednext plan' for this dataset"
        )
    strides = arch["arch_kwargs"]["strides"]
    cfg["architecture"] = architecture_entry(mednext_arch_kwargs(len(strides[0]), strides, preset, kernel))
    return plans


# ----------------------------------------------------------------------------- the epoch loop


@dataclass(frozen=True)
class EpochTiming:
    """How long the epoch that just ended took (seconds, from ``time.perf_counter``)."""

    seconds: float  # the whole epoch: training, validation, checkpoints
    train_seconds: float  # its training iterations alone
    iterations: int  # training iterations it ran
    elapsed: float  # since the loop started


class EpochLoop:
    """The engine's ``run_training`` loop (its hooks in its order) with a progress bar, the CPU memory
    policy around the steps, an epoch without validation iterations, an optional wall-clock budget,
    and :meth:`after_epoch`.

    Mixed into a subclass of ``nnUNetTrainer`` before it: ``class T(EpochLoop, nnUNetTrainer)``.

    With ``budget_s`` set, the run fits that many seconds of training: the first epoch runs with a
    provisional epoch count; after every epoch the duration of the last epoch sets how many epochs are
    left (``floor(remaining / epoch_time)``), and the poly learning-rate schedule is re-targeted to that
    total, so the schedule ends (learning rate near 0) when the budget ends. When no full epoch fits any
    more, a shorter last epoch takes as many iterations as fit (at least ``min_last_epoch_iterations``);
    when an epoch overruns the budget, training stops after it. A resumed run counts the epochs of its
    checkpoint against the budget. ``max_epochs`` caps the count on top of the budget."""

    show_progress: bool = True
    time_per_iteration: float | None = None  # seconds per training iteration in the last epoch
    iterations_done: int = 0
    budget_s: float | None = None  # wall-clock seconds of training; None: run num_epochs epochs
    max_epochs: int | None = None  # optional cap on top of the budget
    min_last_epoch_iterations = 3  # a shorter last epoch uses the budget's rest if this many iterations fit
    # called after every epoch with the trainer and the epoch's timing (progress lines of a caller)
    epoch_listener: Callable[[Any, EpochTiming], None] | None = None

    def run_training(self) -> None:
        self.before_epochs()
        self.on_train_start()
        # On the CPU freed memory stays in the process between steps (mednext.memory): no page faults
        # of every large tensor in every step. The data-loading workers, started above, keep glibc's defaults.
        with reuse_freed_memory(keeps_freed_memory(self.device)):
            self.run_epochs()
        self.on_train_end()

    def before_epochs(self) -> None:
        """Called before ``on_train_start``; a subclass may adjust the run here."""
        self.budget_log: list[dict[str, float]] = []
        self.iterations_done = 0
        self.budget_spent_before = self._logged_training_seconds() if self.current_epoch > 0 else 0.0
        if self.budget_s is not None:
            self.num_epochs = max(self.num_epochs, self.current_epoch + 1)

    def _logged_training_seconds(self) -> float:
        """Seconds of the epochs a resumed run's checkpoint logged (end minus start of each)."""
        log = self.logger.get_checkpoint()
        starts, ends = log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", [])
        return float(sum(e - s for s, e in zip(starts, ends, strict=False)))

    def after_epoch(self, timing: EpochTiming) -> None:
        """Called after ``on_epoch_end`` (``current_epoch`` already counts the finished epoch); with a
        budget it sets ``num_epochs`` (the loop stops once ``current_epoch`` reaches it) and
        ``num_iterations_per_epoch``; a subclass may change them too."""
        if self.budget_s is not None:
            self._fit_budget(timing)
        if self.epoch_listener is not None:
            self.epoch_listener(self, timing)

    def _fit_budget(self, timing: EpochTiming) -> None:
        elapsed = self.budget_spent_before + timing.elapsed
        remaining = self.budget_s - elapsed
        more = int(remaining // timing.seconds) if remaining > 0 else 0
        short = 0  # iterations of a shorter last epoch that fits what is left of the budget
        if more == 0 and remaining > 0:
            per_iteration = timing.train_seconds / timing.iterations
            short = int((remaining - (timing.seconds - timing.train_seconds)) // per_iteration)
            more = 1 if short >= self.min_last_epoch_iterations else 0
        self.num_epochs = self.current_epoch + more
        if self.max_epochs is not None:
            self.num_epochs = min(self.num_epochs, self.max_epochs)
            more = self.num_epochs - self.current_epoch
        if more == 1 and short:
            self.num_iterations_per_epoch = min(short, self.num_iterations_per_epoch)
        if more > 0:
            self.lr_scheduler.max_steps = self.num_epochs  # poly schedule ends with the budget
        self.budget_log.append(
            {
                "epoch": self.current_epoch,
                "epoch_time_s": timing.seconds,
                "elapsed_s": elapsed,
                "iterations": timing.iterations,
                "planned_epochs": self.num_epochs,
            }
        )

    def progress_note(self, iteration: int, train_seconds: float, loop_seconds: float) -> str:
        """The time note of the progress bar after ``iteration`` (0-based) of the current epoch."""
        if self.budget_s is not None:
            return f"budget left {max(0.0, self.budget_s - self.budget_spent_before - loop_seconds):.0f} s"
        per_iteration = train_seconds / (iteration + 1)
        left = per_iteration * (
            (self.num_iterations_per_epoch - iteration - 1)
            + (self.num_epochs - self.current_epoch - 1) * self.num_iterations_per_epoch
        )
        return f"left {_hms(left)}"

    def run_epochs(self) -> None:
        from tqdm import tqdm

        loop_start = time.perf_counter()
        while self.current_epoch < self.num_epochs:
            epoch_start = time.perf_counter()
            self.on_epoch_start()
            self.on_train_epoch_start()
            iterations = self.num_iterations_per_epoch
            bar = tqdm(
                total=iterations,
                desc=f"epoch {self.current_epoch + 1}/{self.num_epochs}",
                disable=not self.show_progress or self.local_rank != 0,
                leave=False,
                dynamic_ncols=True,
            )
            outputs = []
            for i in range(iterations):
                outputs.append(self.train_step(next(self.dataloader_train)))
                now = time.perf_counter()
                note = self.progress_note(i, now - epoch_start, now - loop_start)
                bar.set_postfix_str(f"loss {float(outputs[-1]['loss']):.4f} {note}", refresh=False)
                bar.update(1)
            bar.close()
            train_seconds = time.perf_counter() - epoch_start
            self.time_per_iteration = train_seconds / max(1, iterations)
            self.iterations_done += iterations
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [
                    self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)
                ]
                if val_outputs:
                    self.on_validation_epoch_end(val_outputs)
                else:
                    self._log_no_validation()
            self.on_epoch_end()  # increments current_epoch
            now = time.perf_counter()
            self.after_epoch(EpochTiming(now - epoch_start, train_seconds, iterations, now - loop_start))

    def _log_no_validation(self) -> None:
        # no validation iterations: keep the engine's per-epoch log complete
        for key, value in (("mean_fg_dice", float("nan")), ("val_losses", float("nan"))):
            self.logger.log(key, value, self.current_epoch)
        manager = self.label_manager
        scored = manager.foreground_regions if manager.has_regions else manager.foreground_labels
        self.logger.log("dice_per_class_or_region", [float("nan")] * len(scored), self.current_epoch)


# ----------------------------------------------------------------------------- the trainer


class PlainCheckpoints:
    """Checkpoints of plain values only, written atomically every time and read back with
    ``weights_only=True``: the engine's ``load_checkpoint`` unpickles whatever the file holds (and
    in 2.8.1 fails on a dict before reading it). Mixed into a subclass of ``nnUNetTrainer`` before it;
    :meth:`run_record` is the checkpoint's ``"mednext"`` entry."""

    resume_hint = ""  # added to the error for a checkpoint that another trainer wrote

    def unwrapped_network(self) -> torch.nn.Module:
        """The network without its DDP and ``torch.compile`` wrappers."""
        module = self.network.module if self.is_ddp else self.network
        return getattr(module, "_orig_mod", module)

    def run_record(self) -> dict[str, Any]:
        """The run's settings as the checkpoint records them."""
        return {
            "num_epochs": self.num_epochs,
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
        }

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
            "mednext": self.run_record(),
        }
        atomic_write(filename, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, dict):
            checkpoint = filename_or_checkpoint
        else:
            checkpoint = safe_torch_load(filename_or_checkpoint)
        if checkpoint.get("trainer_name") != self.__class__.__name__:
            raise ValueError(
                f"checkpoint was written by {checkpoint.get('trainer_name')}, not {self.__class__.__name__}"
                f"{self.resume_hint}"
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


class MedNeXtTrainer(EpochLoop, PlainCheckpoints, nnUNetTrainer):
    """nnU-Net v2 trainer for MedNeXt with the reference's recipe. Use a concrete subclass
    (``MedNeXtTrainer_Sk3`` ...) or :func:`get_trainer_class`.

    Settings of a run (epochs, iterations, precision, context slices) are given to
    :meth:`configure_run` between construction and :meth:`initialize`."""

    preset = "S"
    kernel_size = 3
    resume_hint = "; resume with the same --model and --kernel"
    context_slices = 0  # 2D only: neighbouring slices per side as extra input channels (mednext.pipeline.context)

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int | str,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (the engine's signature)
    ) -> None:
        continue_training = plans.get("continue_training", False)
        plans = with_mednext_architecture(plans, configuration, self.preset, self.kernel_size)
        plans["continue_training"] = continue_training
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            # the engine picks cuda:<global rank>, wrong on every node but the first, and CUDA even on CPU
            local = local_rank_from_env()
            self.device = torch.device("cuda", local) if device.type == "cuda" else torch.device(device.type)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        self.initial_lr = 1e-3
        self.weight_decay = 3e-5
        self.adam_eps = 1e-4  # 1e-8 gave NaNs in float16 in the reference
        self.grad_clip = 12.0
        self.num_epochs = 1000
        self.num_iterations_per_epoch = 250
        self.num_val_iterations_per_epoch = 50
        self.save_every = 1  # an interrupted run loses at most one epoch
        self.bf16 = False
        self.compile_network = compile_requested()
        self.show_progress = True
        self.replica_max_abs_diff: float | None = None  # DDP: checked at the end of training
        self.grad_scaler = self.grad_scaler if self.device.type == "cuda" else None
        self._record_context_slices(self.context_slices)

    # -- run settings (before initialize)

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
        """Set the run's length, precision, progress bar, (2D) context slices and ``torch.compile``
        (``compile``: compile the network on CUDA; on other devices the eager network is kept and the
        log says why) before :meth:`initialize`."""
        if self.was_initialized:
            raise RuntimeError("configure_run must be called before initialize()")
        for name, value in (("epochs", epochs), ("iters_per_epoch", iters_per_epoch), ("val_iters", val_iters)):
            if value is not None and (not isinstance(value, int) or value < (0 if name == "val_iters" else 1)):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if epochs is not None:
            self.num_epochs = epochs
        if iters_per_epoch is not None:
            self.num_iterations_per_epoch = iters_per_epoch
        if val_iters is not None:
            self.num_val_iterations_per_epoch = val_iters
        if bf16 and self.device.type != "cuda":
            raise ValueError("--bf16 needs a CUDA device; on CPU and MPS training runs in float32")
        self.bf16 = bool(bf16)
        if self.bf16:
            self.grad_scaler = None  # bfloat16 has float32's range: no loss scaling
        self.show_progress = show_progress
        if compile:
            self.compile_network = True
        if context_slices is not None:
            self._record_context_slices(context_slices)

    def _record_context_slices(self, context_slices: int) -> None:
        self.context_slices = check_context_slices(context_slices, self.configuration_manager.patch_size)
        if self.context_slices:
            # recorded in the plans copied to the results folder, so prediction stacks the same slices
            self.plans_manager.plans["configurations"][self.configuration_name][CONTEXT_KEY] = self.context_slices
            self.configuration_manager.configuration[CONTEXT_KEY] = self.context_slices

    # -- network, loss, optimiser

    def initialize(self) -> None:
        """Network, optimiser, loss and dataset class.

        Written out rather than ``super().initialize()`` because the engine's wraps the network in
        DDP with ``device_ids=[global rank]`` (wrong on every node but the first and on CPU), builds
        its own loss, and compiles by default; the steps are the engine's, in its order."""
        if self.was_initialized:
            raise RuntimeError("initialize() was already called")
        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(
            self.plans_manager, self.configuration_manager, self.dataset_json
        ) * (2 * self.context_slices + 1)
        self.network = self.build_network_architecture(
            self.plans_manager,
            self.configuration_manager,
            self.num_input_channels,
            self.label_manager.num_segmentation_heads,
            self.enable_deep_supervision,
        ).to(self.device)
        if self.compile_network and self.device.type == "cuda":
            # opt-in only: compiling MedNeXt is checked on the CPU (tests/nn/test_compile.py), not on every
            # torch version; no fullgraph, so a graph break in a CUDA kernel's wrapper runs it eagerly
            self.print_to_log_file("Using torch.compile...")
            self.network = torch.compile(self.network)
        elif self.compile_network:
            self.print_to_log_file(
                f"torch.compile skipped on {self.device.type}: the compiled step is slower than the eager one there "
                "(docs/benchmarks.md, 'torch.compile')"
            )
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.network, device_ids=ids)
        self.loss = self.build_loss()
        self.dataset_class = self.training_dataset_class(infer_dataset_class(self.preprocessed_dataset_folder))
        self.was_initialized = True

    def training_dataset_class(self, engine_class: Any) -> Any:
        """The dataset class to train from, given the engine's: with context slices, a stand-in whose
        cases come with their neighbouring slices stacked as channels."""
        return context_dataset_class(engine_class, self.context_slices)

    def get_training_transforms(self, *args: Any, **kwargs: Any) -> Any:
        """The engine's training augmentation; with context slices its intensity transforms treat the
        stacked slices of a sample alike (:func:`~mednext.pipeline.context.synchronise_channels`)."""
        transforms = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        return synchronise_channels(transforms) if self.context_slices else transforms

    @staticmethod
    def build_network_architecture(
        plans_manager: Any,
        configuration_manager: Any,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> torch.nn.Module:
        arch = configuration_manager.configuration["architecture"]
        kwargs = dict(arch["arch_kwargs"])
        kwargs["deep_supervision"] = True  # heads always built so checkpoints load; switched at run time
        net = MedNeXt(in_channels=num_input_channels, num_classes=num_output_channels, **kwargs)
        net.set_deep_supervision(enable_deep_supervision)
        return net

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self.unwrapped_network().set_deep_supervision(enabled)

    def _get_deep_supervision_scales(self) -> list[list[float]] | None:
        # private in the engine, no public hook: its version assumes the U-Net's stride list
        if not self.enable_deep_supervision:
            return None
        strides = np.asarray(self.configuration_manager.pool_op_kernel_sizes, dtype=float)
        steps = np.vstack([np.ones((1, strides.shape[1])), strides])
        return [list(map(float, row)) for row in 1 / np.cumprod(steps, axis=0)]

    def build_loss(self) -> torch.nn.Module:
        """Dice + cross-entropy, weighted over the deep-supervision outputs as the reference.

        Region-based label sets (``regions_class_order`` datasets) get the engine's loss for regions
        instead: Dice on every region's sigmoid (no background to leave out) + binary cross-entropy,
        one output per region; the targets are the engine's one-hot region masks. Batch Dice and the
        deep-supervision weights stay the recipe's."""
        if self.label_manager.has_regions:
            loss: torch.nn.Module = DC_and_BCE_loss(
                {},
                {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": self.is_ddp},
                use_ignore_label=self.label_manager.ignore_label is not None,
                dice_class=MemoryEfficientSoftDiceLoss,
            )
        else:
            loss = DC_and_CE_loss(
                {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": self.is_ddp},
                {},
                weight_ce=1,
                weight_dice=1,
                ignore_label=self.label_manager.ignore_label,
                dice_class=MemoryEfficientSoftDiceLoss,
            )
        if self.enable_deep_supervision:
            n = len(self._get_deep_supervision_scales())
            weights = np.array([DS_WEIGHTS[i] if i < len(DS_WEIGHTS) else 2.0**-i for i in range(n)])
            loss = DeepSupervisionWrapper(loss, weights / weights.sum())
        return loss

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, PolyLRScheduler]:
        optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay, eps=self.adam_eps
        )
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.9)

    def plot_network_architecture(self) -> None:
        pass  # the engine's hiddenlayer plot does not apply to MedNeXt

    # -- steps

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.bf16 else torch.float16)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.network(data)
            loss = self.loss(output, target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """The engine's final validation with :class:`~mednext.pipeline.predictor.MedNeXtPredictor` as
        its predictor: the sliding window that ``mednext predict`` runs (several tiles per forward),
        and a log line about the windows of a long case every 30 s, so that a validation case that
        takes many minutes shows progress. The engine builds its predictor by the name
        ``nnUNetPredictor`` in its trainer's module; that name points at ours for the call only."""
        from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as engine_module

        from mednext.pipeline.cohort import Progress
        from mednext.pipeline.predictor import MedNeXtPredictor

        progress = Progress(0, self.print_to_log_file)  # the engine logs each case; this, its windows

        class ValidationPredictor(MedNeXtPredictor):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.window_progress = progress.windows

        engine_predictor = engine_module.nnUNetPredictor
        engine_module.nnUNetPredictor = ValidationPredictor
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            engine_module.nnUNetPredictor = engine_predictor

    def on_validation_epoch_start(self) -> None:
        # MedNeXt returns its deep-supervision list only in training mode; it has no dropout or batch
        # statistics, so training mode under no_grad computes exactly what eval mode does
        self.network.train()

    def validation_step(self, batch: dict) -> dict:
        # the engine's step opens a float16 autocast on CUDA; an outer bfloat16 one sets its dtype
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            return super().validation_step(batch)

    def on_epoch_end(self) -> None:
        super().on_epoch_end()  # increments current_epoch; saves latest/best checkpoints and progress.png
        if self.local_rank == 0:
            self.write_json_log()

    # -- logging and checkpoints

    def write_json_log(self) -> None:
        """``training_log.json``: one entry per finished epoch, plus the run's settings."""
        log = self.logger.get_checkpoint()
        epochs = []
        for e in range(len(log["train_losses"])):

            def at(key: str, e: int = e) -> Any:
                values = log.get(key, [])
                return plain_values(values[e]) if e < len(values) else None

            start, end = at("epoch_start_timestamps"), at("epoch_end_timestamps")
            epochs.append(
                {
                    "epoch": e,
                    "train_loss": at("train_losses"),
                    "val_loss": at("val_losses"),
                    "pseudo_dice": at("dice_per_class_or_region"),
                    "mean_fg_dice": at("mean_fg_dice"),
                    "ema_fg_dice": at("ema_fg_dice"),
                    "lr": at("lrs"),
                    "epoch_time_s": (end - start) if start is not None and end is not None else None,
                }
            )
        doc = {
            "trainer": self.__class__.__name__,
            "plans": self.plans_manager.plans_name,
            "configuration": self.configuration_name,
            "fold": self.fold,
            "device": str(self.device),
            "precision": self.precision_name(),
            "num_epochs": self.num_epochs,
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
            "batch_size": self.batch_size if hasattr(self, "batch_size") else None,
            "patch_size": list(self.configuration_manager.patch_size),
            "world_size": dist.get_world_size() if self.is_ddp else 1,
            "replica_max_abs_diff": self.replica_max_abs_diff,
            "finished": Path(self.output_folder, "checkpoint_final.pth").is_file(),
            "epochs": epochs,
        }
        atomic_write_text(Path(self.output_folder) / LOG_NAME, json.dumps(_json_safe(doc), indent=1))

    def precision_name(self) -> str:
        if self.device.type != "cuda":
            return "float32"
        return "bfloat16 autocast" if self.bf16 else "float16 autocast + grad scaling"

    def run_record(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "kernel_size": self.kernel_size,
            **super().run_record(),
            "bf16": self.bf16,
            "architecture": self.configuration_manager.configuration["architecture"],
        }

    def on_train_end(self) -> None:
        if self.is_ddp:
            self.replica_max_abs_diff = replica_max_abs_diff(self.unwrapped_network())
        super().on_train_end()
        if self.local_rank == 0:
            self.write_json_log()
        if self.is_ddp:
            dist.barrier()


# ----------------------------------------------------------------------------- presets and kernels


class MedNeXtTrainer_Sk3(MedNeXtTrainer):  # noqa: N801 (nnU-Net's trainer naming)
    """MedNeXt S, kernel 3, reference recipe."""

    preset = "S"
    kernel_size = 3


class MedNeXtTrainer_Sk5(MedNeXtTrainer):  # noqa: N801
    """MedNeXt S, kernel 5, reference recipe."""

    preset = "S"
    kernel_size = 5


class MedNeXtTrainer_Bk3(MedNeXtTrainer):  # noqa: N801
    """MedNeXt B, kernel 3, reference recipe."""

    preset = "B"
    kernel_size = 3


class MedNeXtTrainer_Bk5(MedNeXtTrainer):  # noqa: N801
    """MedNeXt B, kernel 5, reference recipe."""

    preset = "B"
    kernel_size = 5


class MedNeXtTrainer_Mk3(MedNeXtTrainer):  # noqa: N801
    """MedNeXt M, kernel 3, reference recipe."""

    preset = "M"
    kernel_size = 3


class MedNeXtTrainer_Mk5(MedNeXtTrainer):  # noqa: N801
    """MedNeXt M, kernel 5, reference recipe."""

    preset = "M"
    kernel_size = 5


class MedNeXtTrainer_Lk3(MedNeXtTrainer):  # noqa: N801
    """MedNeXt L, kernel 3, reference recipe."""

    preset = "L"
    kernel_size = 3


class MedNeXtTrainer_Lk5(MedNeXtTrainer):  # noqa: N801
    """MedNeXt L, kernel 5, reference recipe."""

    preset = "L"
    kernel_size = 5


class MedNeXtTrainer_V2Basek3(MedNeXtTrainer):  # noqa: N801
    """MedNeXt-v2 Base (C=32, GRN in every block), kernel 3, the reference v1 recipe."""

    preset = "V2-BASE"
    kernel_size = 3


class MedNeXtTrainer_V2Widek3(MedNeXtTrainer):  # noqa: N801
    """MedNeXt-v2 Wide (C=64, GRN in every block), kernel 3, the reference v1 recipe."""

    preset = "V2-WIDE"
    kernel_size = 3


TRAINERS: dict[str, type[MedNeXtTrainer]] = {
    cls.__name__: cls
    for cls in (
        MedNeXtTrainer_Sk3,
        MedNeXtTrainer_Sk5,
        MedNeXtTrainer_Bk3,
        MedNeXtTrainer_Bk5,
        MedNeXtTrainer_Mk3,
        MedNeXtTrainer_Mk5,
        MedNeXtTrainer_Lk3,
        MedNeXtTrainer_Lk5,
        MedNeXtTrainer_V2Basek3,
        MedNeXtTrainer_V2Widek3,
    )
}


def get_trainer_class(preset: str, kernel: int) -> type[MedNeXtTrainer]:
    """The trainer class of a preset (S, B, M, L, V2-BASE, V2-WIDE) and an odd kernel size: the
    written-out class where there is one (kernels 3 and 5 of v1, 3 of v2), else one made on first use
    with the same recipe and the name nnU-Net expects (``MedNeXtTrainer_Sk7``), registered in
    :data:`TRAINERS` so that the engine finds it by name."""
    name = trainer_class_name(preset, kernel)
    if name in TRAINERS:
        return TRAINERS[name]
    if str(preset).upper() not in PRESETS or int(kernel) < 1 or int(kernel) % 2 == 0:
        raise ValueError(
            f"no trainer for model {preset!r} kernel {kernel!r}; use --model S|B|M|L|v2-base|v2-wide and an odd "
            "--kernel (3, 5, 7, ...)"
        )

    class OtherKernelTrainer(MedNeXtTrainer):
        __doc__ = f"MedNeXt {str(preset).upper()}, kernel {int(kernel)}, reference recipe."
        # nnU-Net finds trainers by class name, and names results folders after it
        __qualname__ = name

    OtherKernelTrainer.__name__ = name
    OtherKernelTrainer.preset = str(preset).upper()
    OtherKernelTrainer.kernel_size = int(kernel)
    TRAINERS[name] = OtherKernelTrainer
    return OtherKernelTrainer
