"""The training engine: what every training loop of the package shares (no Ray).

A loop built on it reads like nanoGPT's ``train.py``: make the model, wrap it, build an
:class:`Engine` (an optimizer from :func:`build_adamw`, tri-stage schedule, AMP,
accumulation, clipping), optionally restore its state (and weights: :func:`load_weights`),
then per epoch call :meth:`Engine.step` on groups of micro-batches, log to a
:class:`ScalarLog` and hand a checkpoint writer to whoever saves checkpoints. Fine-tuning
(:mod:`ser_ray.training.finetune`) and pre-training (:mod:`ser_ray.training.pretrain`) are both
such loops.

- AMP: autocast in bf16 (or fp16 with a ``GradScaler``) on CUDA only; float32 on CPU.
- Accumulation: one optimizer step per group of micro-batches; each micro-batch's loss is
  already weighted by the caller so that the group's gradient is the group's mean.
- Exact resume: the train state holds optimizer, schedule, scaler, progress and every RNG
  state, so a loop resumed from the end of epoch ``e`` continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ser_ray.models.precision import resolve_amp
from ser_ray.training.schedule import build_scheduler
from ser_ray.training.settings import LoopSettings, ScheduleSettings

log = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, numpy and torch with ``seed + rank``: DDP ranks draw different dropout
    and masks (weights and batch order do not depend on these RNGs)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def rng_states() -> dict[str, Any]:
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights and other 1-D parameters get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def build_adamw(
    model: nn.Module,
    *,
    lr: float | dict[str, float],
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    part_of: Callable[[str], str] | None = None,
    no_decay: Callable[[str, nn.Parameter], bool] = no_weight_decay,
    keep: Callable[[str], bool] | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (those ``keep(name)`` accepts, if given), one
    param group per (part, decay or not).

    ``part_of(name)`` names each parameter's part (e.g. ``encoder`` or ``head``) and ``lr``
    maps parts to their peak LR; without parts, ``lr`` is one float. Groups are named
    ``<part>`` and ``<part>/no_decay`` (``decay`` and ``no_decay`` without parts), sorted by
    name. Call before any temporary freezing.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad and (keep is None or keep(name)):
            part = part_of(name) if part_of is not None else ""
            groups.setdefault((part, no_decay(name, p)), []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    param_groups = [
        {
            "params": params,
            "lr": lr[part] if isinstance(lr, dict) else lr,
            "weight_decay": 0.0 if skip_decay else weight_decay,
            "name": "/".join(x for x in (part, "no_decay" if skip_decay else "") if x) or "decay",
        }
        for (part, skip_decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps)


def steps_per_epoch(num_batches: int, grad_accum_steps: int) -> int:
    """Optimizer steps in an epoch of ``num_batches`` micro-batches (a short last group
    counts as a step)."""
    return math.ceil(num_batches / grad_accum_steps)


def read_safetensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``folder`` (one file or shards)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def load_weights(module: nn.Module, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the weights saved in ``folder`` into ``module``; every key must fit."""
    weights = read_safetensors(folder)
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder} does not fit the model: missing {missing}, extra {unexpected}")
    return weights


class Engine:
    """Optimizer steps for one model: schedule, AMP, accumulation, clipping, NaN check.

    ``model`` is the bare model (its ``state_dict`` is what gets saved), ``wrapped`` what
    runs the forward pass (DDP or the model itself).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        schedule: ScheduleSettings,
        device: torch.device,
        amp: str = "auto",
        grad_clip_norm: float | None = None,
        wrapped: nn.Module | None = None,
    ):
        self.model = model
        self.wrapped = wrapped if wrapped is not None else model
        self.optimizer = optimizer
        self.scheduler = build_scheduler(optimizer, total_steps, **dataclasses.asdict(schedule))
        self.device = device
        self.amp_dtype = resolve_amp(amp, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.grad_clip_norm = grad_clip_norm
        self.total_steps = total_steps

    def autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled)

    def step(
        self,
        micro_batches: Sequence[Any],
        loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]],
        *,
        where: str = "",
    ) -> list[dict[str, float]]:
        """One optimizer step over ``micro_batches``; returns each micro-batch's logs.

        ``loss_fn(wrapped, micro_batch) -> (loss, logs)``: ``loss`` is the micro-batch's
        share of the group's mean loss (the caller weights it); gradients of all but the
        last micro-batch are not synchronised across DDP ranks (``no_sync``).
        """
        self.optimizer.zero_grad(set_to_none=True)
        logs = []
        for j, batch in enumerate(micro_batches):
            last = j == len(micro_batches) - 1
            no_sync = getattr(self.wrapped, "no_sync", None)
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync:
                with self.autocast():
                    loss, values = loss_fn(self.wrapped, batch)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"training loss is {loss.item()} {where} (learning rates "
                        f"{self.learning_rates()}): training diverged; lower the learning "
                        "rates or set grad_clip_norm"
                    )
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            logs.append(values)
        if self.grad_clip_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return logs

    def learning_rates(self) -> dict[str, float]:
        """Current LR per named param group (``name`` key; else the group's index)."""
        return {
            str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: LoopSettings,
    *,
    total_steps: int,
    device: torch.device,
    wrapped: nn.Module | None = None,
) -> Engine:
    """An :class:`Engine` with the schedule, AMP and clipping of a loop's settings."""
    return Engine(
        model,
        optimizer,
        total_steps=total_steps,
        schedule=settings.schedule(),
        device=device,
        amp=settings.amp,
        grad_clip_norm=settings.grad_clip_norm,
        wrapped=wrapped,
    )


def write_train_state(out_dir: str | os.PathLike, engine: Engine, progress: dict[str, Any]) -> Path:
    """Save the engine's state, the loop's ``progress`` and every RNG state (not weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TRAIN_STATE_FILE
    torch.save({**engine.state_dict(), "progress": progress, "rng": rng_states()}, path)
    return path


def load_train_state(ckpt_dir: str | os.PathLike, engine: Engine) -> dict[str, Any]:
    """Restore what :func:`write_train_state` saved into ``engine`` and the RNGs; returns
    the loop's progress."""
    saved = torch.load(Path(ckpt_dir) / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    engine.load_state_dict(saved)
    set_rng_states(saved["rng"])
    return saved["progress"]


class ScalarLog:
    """TensorBoard scalars from rank 0 (a no-op elsewhere or without a folder).

    On resume, events after ``resume_step`` from the interrupted run are purged, so the
    curves have no doubled stretch.
    """

    def __init__(self, log_dir: str | os.PathLike | None, rank: int = 0, resume_step: int = 0):
        self.writer = None
        if rank == 0 and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=resume_step or None)

    def add(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
