"""The MedNeXt trainer: a narrow subclass of nnU-Net v2's ``nnUNetTrainer`` with the reference recipe.

What differs from the engine's trainer, and nothing else:

* network: :class:`mednext.nn.MedNeXt`, preset and kernel from the class name
  (``MedNeXtTrainer_Sk3`` ... ``MedNeXtTrainer_Lk5``); the plans handed to the engine (and copied to
  the results folder) describe exactly that network;
* optimiser: AdamW, lr 1e-3, weight decay 3e-5, eps 1e-4, poly decay (0.9) per epoch; gradient
  clipping at norm 12;
* loss: Dice (batch Dice, background excluded) + cross-entropy on all five deep-supervision outputs,
  weights 1, 1/2, 1/4, 1/8, 1/16 normalised to sum 1;
* precision: float16 autocast with gradient scaling on CUDA, bfloat16 autocast without scaling when
  ``bf16`` is set, float32 elsewhere;
* DDP: the process's local rank picks the GPU (the engine uses the global rank); gloo on CPU;
* checkpoints: written every epoch to a temporary file then renamed, with plain Python values only
  so that ``torch.load(..., weights_only=True)`` reads them; a JSON log per epoch; a progress bar.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import distributed as dist

from mednext.memory import keeps_freed_memory, reuse_freed_memory
from mednext.pipeline.context import CONTEXT_KEY, check_context_slices, context_dataset_class, synchronise_channels
from mednext.pipeline.planning import architecture_entry, mednext_arch_kwargs

PRESETS = ("S", "B", "M", "L")
KERNELS = (3, 5)
DS_WEIGHTS = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16)  # full resolution first, as the reference
LOG_NAME = "training_log.json"
N_PROC_DA = "nnUNet_n_proc_DA"  # the engine's variable: data-augmentation worker processes per GPU


def trainer_class_name(preset: str, kernel: int) -> str:
    """``MedNeXtTrainer_Sk3`` etc."""
    return f"MedNeXtTrainer_{preset.upper()}k{int(kernel)}"


def _plain(value: Any) -> Any:
    """Numpy scalars/arrays, tuples and devices as plain Python values (for weights_only loading)."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, (str, int)) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.device):
        return str(value)
    return value


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


class MedNeXtTrainer(nnUNetTrainer):
    """nnU-Net v2 trainer for MedNeXt with the reference's recipe. Use a concrete subclass
    (``MedNeXtTrainer_Sk3`` ...) or :func:`get_trainer_class`."""

    preset = "S"
    kernel_size = 3
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
        if self.context_slices:
            # recorded in the plans copied to the results folder, so prediction stacks the same slices
            plans["configurations"][configuration][CONTEXT_KEY] = self.context_slices
        super().__init__(plans, configuration, fold, dataset_json, device)
        check_context_slices(self.context_slices, self.configuration_manager.patch_size)
        if self.is_ddp:
            # the engine picks cuda:<global rank>, wrong on every node but the first, and CUDA even on CPU
            local = int(os.environ.get("LOCAL_RANK", "0"))
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
        self.show_progress = True
        self.time_per_iteration: float | None = None
        self.replica_max_abs_diff: float | None = None  # DDP: checked at the end of training
        self.grad_scaler = self.grad_scaler if self.device.type == "cuda" else None

    # -- run settings (before initialize)

    def configure_run(
        self,
        epochs: int | None = None,
        iters_per_epoch: int | None = None,
        val_iters: int | None = None,
        bf16: bool = False,
        show_progress: bool = True,
    ) -> None:
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

    # -- network, loss, optimiser

    def initialize(self) -> None:
        if self.was_initialized:
            raise RuntimeError("initialize() was already called")
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

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
        if self._do_i_compile():
            self.print_to_log_file("Using torch.compile...")
            self.network = torch.compile(self.network)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.network, device_ids=ids)
        self.loss = self._build_loss()
        self.dataset_class = context_dataset_class(
            infer_dataset_class(self.preprocessed_dataset_folder), self.context_slices
        )
        self.was_initialized = True

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
        from mednext.nn import MedNeXt

        arch = configuration_manager.configuration["architecture"]
        kwargs = dict(arch["arch_kwargs"])
        kwargs["deep_supervision"] = True  # heads always built so checkpoints load; switched at run time
        net = MedNeXt(in_channels=num_input_channels, num_classes=num_output_channels, **kwargs)
        net.set_deep_supervision(enable_deep_supervision)
        return net

    def _do_i_compile(self) -> bool:
        # opt-in only (nnUNet_compile=1): compiling MedNeXt is not validated on every torch version
        flag = os.environ.get("nnUNet_compile", "0").lower() in ("1", "true", "t")  # noqa: SIM112
        return flag and self.device.type == "cuda"

    def _unwrapped(self) -> torch.nn.Module:
        mod = self.network.module if self.is_ddp else self.network
        return getattr(mod, "_orig_mod", mod)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self._unwrapped().set_deep_supervision(enabled)

    def _get_deep_supervision_scales(self) -> list[list[float]] | None:
        if not self.enable_deep_supervision:
            return None
        strides = np.asarray(self.configuration_manager.pool_op_kernel_sizes, dtype=float)
        steps = np.vstack([np.ones((1, strides.shape[1])), strides])
        return [list(map(float, row)) for row in 1 / np.cumprod(steps, axis=0)]

    def _build_loss(self) -> torch.nn.Module:
        if self.label_manager.has_regions:
            raise ValueError("region-based labels are not supported by the MedNeXt trainer; use integer labels")
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

    def on_validation_epoch_start(self) -> None:
        # MedNeXt returns its deep-supervision list only in training mode; it has no dropout or batch
        # statistics, so training mode under no_grad computes exactly what eval mode does
        self.network.train()

    def validation_step(self, batch: dict) -> dict:
        # the engine's step opens a float16 autocast on CUDA; an outer bfloat16 one sets its dtype
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            return super().validation_step(batch)

    # -- loop with a progress bar

    def _progress(self, total: int, epoch: int) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=f"epoch {epoch + 1}/{self.num_epochs}",
            disable=not self.show_progress or self.local_rank != 0,
            leave=False,
            dynamic_ncols=True,
        )

    def _batches(self, loader: Any, count: int) -> Iterator[dict]:
        for _ in range(count):
            yield next(loader)

    def run_training(self) -> None:
        self.on_train_start()
        # On the CPU freed memory stays in the process between steps (mednext.memory): no page faults
        # of every large tensor in every step. The data-loading workers, started above, keep glibc's defaults.
        with reuse_freed_memory(keeps_freed_memory(self.device)):
            self._run_epochs()
        self.on_train_end()

    def _run_epochs(self) -> None:
        for epoch in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            bar = self._progress(self.num_iterations_per_epoch, epoch)
            start = time.perf_counter()
            for i, batch in enumerate(self._batches(self.dataloader_train, self.num_iterations_per_epoch)):
                outputs.append(self.train_step(batch))
                per_it = (time.perf_counter() - start) / (i + 1)
                left = per_it * (
                    (self.num_iterations_per_epoch - i - 1)
                    + (self.num_epochs - epoch - 1) * self.num_iterations_per_epoch
                )
                bar.set_postfix_str(f"loss {float(outputs[-1]['loss']):.4f} left {_hms(left)}", refresh=False)
                bar.update(1)
            bar.close()
            self.time_per_iteration = (time.perf_counter() - start) / max(1, self.num_iterations_per_epoch)
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [
                    self.validation_step(b)
                    for b in self._batches(self.dataloader_val, self.num_val_iterations_per_epoch)
                ]
                if val_outputs:
                    self.on_validation_epoch_end(val_outputs)
                else:  # no validation iterations: keep the engine's per-epoch log complete
                    for key, value in (("mean_fg_dice", float("nan")), ("val_losses", float("nan"))):
                        self.logger.log(key, value, self.current_epoch)
                    self.logger.log(
                        "dice_per_class_or_region",
                        [float("nan")] * len(self.label_manager.foreground_labels),
                        self.current_epoch,
                    )
            self.on_epoch_end()

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
                return _plain(values[e]) if e < len(values) else None

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

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self._unwrapped().state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": _plain(self.logger.get_checkpoint()),
            "_best_ema": _plain(self._best_ema),
            "current_epoch": self.current_epoch + 1,
            "init_args": _plain(self.my_init_kwargs),
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": _plain(self.inference_allowed_mirroring_axes),
            "mednext": {
                "preset": self.preset,
                "kernel_size": self.kernel_size,
                "num_epochs": self.num_epochs,
                "iterations_per_epoch": self.num_iterations_per_epoch,
                "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                "bf16": self.bf16,
                "architecture": self.configuration_manager.configuration["architecture"],
            },
        }
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, (str, os.PathLike)):
            checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=True)
        else:
            checkpoint = filename_or_checkpoint
        if checkpoint.get("trainer_name") != self.__class__.__name__:
            raise ValueError(
                f"checkpoint was written by {checkpoint.get('trainer_name')}, not {self.__class__.__name__}; "
                f"resume with the same --model and --kernel"
            )
        weights = {k.removeprefix("module."): v for k, v in checkpoint["network_weights"].items()}
        self._unwrapped().load_state_dict(weights)
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        if checkpoint.get("inference_allowed_mirroring_axes") is not None:
            self.inference_allowed_mirroring_axes = tuple(checkpoint["inference_allowed_mirroring_axes"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    def on_train_end(self) -> None:
        if self.is_ddp:
            from mednext.pipeline.ddp import replica_max_abs_diff

            self.replica_max_abs_diff = replica_max_abs_diff(self._unwrapped())
        super().on_train_end()
        if self.local_rank == 0:
            self.write_json_log()
        if self.is_ddp:
            dist.barrier()


def _json_safe(value: Any) -> Any:
    value = _plain(value)
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


def _make_trainer_classes() -> dict[str, type[MedNeXtTrainer]]:
    classes = {}
    for preset in PRESETS:
        for kernel in KERNELS:
            name = trainer_class_name(preset, kernel)
            doc = f"MedNeXt {preset}, kernel {kernel}, reference recipe."
            classes[name] = type(name, (MedNeXtTrainer,), {"preset": preset, "kernel_size": kernel, "__doc__": doc})
            classes[name].__module__ = __name__
    return classes


TRAINERS = _make_trainer_classes()
globals().update(TRAINERS)  # importable by name: mednext.pipeline.trainer.MedNeXtTrainer_Sk3


def get_trainer_class(preset: str, kernel: int) -> type[MedNeXtTrainer]:
    name = trainer_class_name(preset, kernel)
    if name not in TRAINERS:
        raise ValueError(f"no trainer for model {preset!r} kernel {kernel!r}; use --model S|B|M|L and --kernel 3|5")
    return TRAINERS[name]


# ----------------------------------------------------------------------------- running a fold


def find_plans(dataset_name: str, recipe: str | None = None) -> str:
    """The plans identifier to train with: that of ``recipe``, else the auto plans if present, else
    the paper plans."""
    from nnunetv2.paths import nnUNet_preprocessed

    from mednext.pipeline.planning import RECIPES

    folder = Path(str(nnUNet_preprocessed)) / dataset_name
    candidates = [RECIPES[recipe]] if recipe else list(RECIPES.values())
    for ident in candidates:
        if (folder / f"{ident}.json").is_file():
            return ident
    wanted = f"--recipe {recipe}" if recipe else ""
    raise FileNotFoundError(
        f"{folder} has no {' or '.join(c + '.json' for c in candidates)}; run "
        f"'mednext plan {dataset_name} {wanted}'".rstrip()
        + " first (with the same --workdir)"
    )


def parse_fold(fold: str | int) -> int | str:
    text = str(fold)
    if text == "all":
        return "all"
    if text.isdigit() and 0 <= int(text) <= 4:
        return int(text)
    raise ValueError(f"--fold {fold!r}: use 0, 1, 2, 3, 4 (five-fold cross-validation) or all")


def pick_device(name: str | None) -> torch.device:
    """``cuda`` when available, else ``mps``, else ``cpu``; an explicit request is checked."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r}: use cpu, cuda or mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: Apple's MPS backend is not available here; use --device cpu")
    return torch.device(name)


def train_fold(
    dataset: str | int,
    configuration: str = "3d_fullres",
    fold: int | str = 0,
    preset: str = "S",
    kernel: int = 3,
    device: str | None = None,
    epochs: int | None = None,
    iters_per_epoch: int | None = None,
    val_iters: int | None = None,
    resume: bool = False,
    bf16: bool = False,
    num_workers: int | None = None,
    recipe: str | None = None,
    validate: bool = True,
    pretrained: str | None = None,
    upkern_from: str | None = None,
    show_progress: bool = True,
) -> MedNeXtTrainer:
    """Train one fold (the working folders must be set, see ``use_workdir``) and return the trainer.

    Results go to ``$nnUNet_results/<dataset>/MedNeXtTrainer_<P>k<K>__<plans>__<config>/fold_<f>/``."""
    from nnunetv2.paths import nnUNet_preprocessed

    from mednext.pipeline.datasets import resolve_dataset

    name = resolve_dataset(dataset)
    fold = parse_fold(fold)
    cls = get_trainer_class(str(preset).upper(), int(kernel))
    dev = pick_device(device)
    if pretrained and upkern_from:
        raise ValueError("--pretrained and --upkern-from both initialise the weights; pass one of them")
    if resume and (pretrained or upkern_from):
        raise ValueError("--resume continues from the run's own checkpoint; drop --pretrained/--upkern-from")
    plans_id = find_plans(name, recipe)
    base = Path(str(nnUNet_preprocessed)) / name
    plans = json.loads((base / f"{plans_id}.json").read_text())
    if configuration not in plans["configurations"]:
        raise ValueError(
            f"configuration {configuration!r} was not planned for {name} (plans {plans_id} has "
            f"{', '.join(plans['configurations'])}); run 'mednext plan {name} --configs {configuration}'"
        )
    data_dir = base / plans["configurations"][configuration]["data_identifier"]
    if not data_dir.is_dir() or not any(data_dir.iterdir()):
        raise FileNotFoundError(
            f"{data_dir} is missing or empty: {configuration} was planned but not preprocessed; run "
            f"'mednext plan {name} --configs {configuration}'"
        )
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
    previous_workers = os.environ.get(N_PROC_DA)
    if num_workers is not None:
        os.environ[N_PROC_DA] = str(num_workers)
    elif previous_workers is None and dev.type == "cpu":
        # on CPU the network, not augmentation, is the bottleneck; background workers only compete for cores
        os.environ[N_PROC_DA] = "0"
    try:
        return _run_fold(
            name, plans, plans_id, base, cls, configuration, fold, dev, epochs, iters_per_epoch, val_iters,
            resume, bf16, validate, pretrained, upkern_from, show_progress,
        )  # fmt: skip
    finally:
        if previous_workers is None:
            os.environ.pop(N_PROC_DA, None)
        else:
            os.environ[N_PROC_DA] = previous_workers


def _run_fold(
    name: str,
    plans: dict,
    plans_id: str,
    base: Path,
    cls: type[MedNeXtTrainer],
    configuration: str,
    fold: int | str,
    dev: torch.device,
    epochs: int | None,
    iters_per_epoch: int | None,
    val_iters: int | None,
    resume: bool,
    bf16: bool,
    validate: bool,
    pretrained: str | None,
    upkern_from: str | None,
    show_progress: bool,
) -> MedNeXtTrainer:
    from mednext.pipeline.ddp import init_distributed

    init_distributed(dev.type)

    dataset_json = json.loads((base / "dataset.json").read_text())
    plans["continue_training"] = resume
    trainer = cls(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json, device=dev)
    out = Path(trainer.output_folder)
    latest, final = out / "checkpoint_latest.pth", out / "checkpoint_final.pth"
    if resume:
        if not latest.is_file():
            if final.is_file():
                raise ValueError(f"{final} exists: this fold already finished training; nothing to resume")
            raise FileNotFoundError(f"{latest} not found: nothing to resume; start the run without --resume")
        state = torch.load(latest, map_location="cpu", weights_only=True)
        saved = state.get("mednext", {})
        trainer.configure_run(
            epochs=epochs if epochs is not None else saved.get("num_epochs"),
            iters_per_epoch=iters_per_epoch if iters_per_epoch is not None else saved.get("iterations_per_epoch"),
            val_iters=val_iters if val_iters is not None else saved.get("val_iterations_per_epoch"),
            bf16=bf16,
            show_progress=show_progress,
        )
        trainer.load_checkpoint(state)
        del state
    else:
        for ckpt in (latest, final):
            if ckpt.is_file():
                raise ValueError(
                    f"{ckpt} exists from an earlier run; pass --resume to continue it, or delete {out} to start over"
                )
        trainer.configure_run(epochs, iters_per_epoch, val_iters, bf16, show_progress)
        trainer.initialize()
        if pretrained:
            from mednext.nn.weights import transfer_weights

            report = transfer_weights(trainer._unwrapped(), pretrained)
            trainer.print_to_log_file(f"initialised from {pretrained}: {report.summary()}")
        if upkern_from:
            from mednext.nn import upkern

            report = upkern(trainer._unwrapped(), upkern_from)
            trainer.print_to_log_file(f"UpKern from {upkern_from}: {report.summary()}")
    trainer.run_training()
    if validate:
        trainer.perform_actual_validation(save_probabilities=False)
    return trainer
