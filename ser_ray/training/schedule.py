"""Learning-rate schedule as a pure function of the optimizer step (no Ray).

Three phases over ``total_steps`` optimizer steps: a linear warm-up over the first
``warmup_frac`` of the steps, a constant plateau at the peak, and a decay that starts at
``decay_start_frac`` of the steps and ends at ``final_lr_scale`` times the peak at the last
step. The decay shape is ``linear``, ``cosine`` or ``exponential`` (geometric).

The function returns a *multiplier* of the peak rate, so one schedule drives param groups
with different peaks (encoder and head) through :class:`torch.optim.lr_scheduler.LambdaLR`.

>>> round(lr_multiplier(0, 100), 4)  # first step of the warm-up: 1 / (10 + 1)
0.0909
>>> lr_multiplier(10, 100), lr_multiplier(50, 100), lr_multiplier(70, 100)
(1.0, 1.0, 1.0)
>>> round(lr_multiplier(85, 100, final_lr_scale=0.0), 4)  # half-way through a linear decay
0.5
>>> lr_multiplier(100, 100, final_lr_scale=0.05)
0.05
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for the type of build_scheduler's arguments
    import torch

DECAY_SHAPES = ("linear", "cosine", "exponential")


def phase_steps(
    total_steps: int, warmup_frac: float = 0.1, decay_start_frac: float = 0.7
) -> tuple[int, int]:
    """(warm-up steps, step at which the decay starts) for ``total_steps``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_frac <= 1.0:
        raise ValueError(f"warmup_frac must be in [0, 1], got {warmup_frac}")
    if not warmup_frac <= decay_start_frac <= 1.0:
        raise ValueError(
            f"decay_start_frac must be in [warmup_frac, 1] = [{warmup_frac}, 1], "
            f"got {decay_start_frac}"
        )
    warmup_steps = round(warmup_frac * total_steps)
    decay_start_step = max(warmup_steps, round(decay_start_frac * total_steps))
    return warmup_steps, decay_start_step


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_frac: float = 0.1,
    decay_start_frac: float = 0.7,
    final_lr_scale: float = 0.05,
    decay_shape: str = "linear",
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    - warm-up (``step < W``, ``W = round(warmup_frac * total_steps)``): ``(step + 1) / (W + 1)``,
      so the first update already moves and the peak is reached at step ``W``;
    - plateau (``W <= step < D``, ``D = round(decay_start_frac * total_steps)``): 1;
    - decay (``D <= step <= total_steps``): from 1 at ``D`` to ``final_lr_scale`` at
      ``total_steps``, along the chosen shape. Steps past the end stay at ``final_lr_scale``.
    """
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, got {decay_shape!r}")
    if not 0.0 <= final_lr_scale <= 1.0:
        raise ValueError(f"final_lr_scale must be in [0, 1], got {final_lr_scale}")
    if decay_shape == "exponential" and final_lr_scale <= 0.0:
        raise ValueError("an exponential decay needs final_lr_scale > 0")
    warmup_steps, decay_start_step = phase_steps(total_steps, warmup_frac, decay_start_frac)
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step < decay_start_step or decay_start_step >= total_steps:
        return 1.0
    progress = min(1.0, (step - decay_start_step) / (total_steps - decay_start_step))
    if decay_shape == "linear":
        return 1.0 - (1.0 - final_lr_scale) * progress
    if decay_shape == "cosine":
        return final_lr_scale + (1.0 - final_lr_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return final_lr_scale**progress


def make_lr_lambda(
    total_steps: int,
    warmup_frac: float = 0.1,
    decay_start_frac: float = 0.7,
    final_lr_scale: float = 0.05,
    decay_shape: str = "linear",
) -> Callable[[int], float]:
    """``step -> multiplier`` with the settings bound (validated once, picklable)."""
    lr_multiplier(0, total_steps, warmup_frac, decay_start_frac, final_lr_scale, decay_shape)
    return functools.partial(
        lr_multiplier,
        total_steps=total_steps,
        warmup_frac=warmup_frac,
        decay_start_frac=decay_start_frac,
        final_lr_scale=final_lr_scale,
        decay_shape=decay_shape,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_frac: float = 0.1,
    decay_start_frac: float = 0.7,
    final_lr_scale: float = 0.05,
    decay_shape: str = "linear",
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying the schedule to every param group (each keeps its own peak)."""
    from torch.optim.lr_scheduler import LambdaLR

    fn = make_lr_lambda(total_steps, warmup_frac, decay_start_frac, final_lr_scale, decay_shape)
    return LambdaLR(optimizer, lr_lambda=fn)


def gumbel_temperature(
    step: int, total_steps: int, max_temperature: float = 2.0, min_temperature: float = 0.5
) -> float:
    """Temperature of the quantizer's Gumbel softmax at optimizer step ``step``.

    wav2vec 2.0 anneals it geometrically from 2 to 0.5 over pre-training (a factor of
    0.999995 per update over 400k updates); here the same curve is stretched over
    ``total_steps``: ``max * (min / max) ** (step / total_steps)``, floored at ``min``.

    >>> gumbel_temperature(0, 100), gumbel_temperature(100, 100), gumbel_temperature(50, 100)
    (2.0, 0.5, 1.0)
    """
    if not 0 < min_temperature <= max_temperature:
        raise ValueError(
            f"need 0 < min_temperature <= max_temperature, got {min_temperature}, {max_temperature}"
        )
    progress = min(1.0, step / max(total_steps, 1))
    return max(min_temperature, max_temperature * (min_temperature / max_temperature) ** progress)
