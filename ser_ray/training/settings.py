"""Settings both training loops share, declared once, in small groups of fields.

Each group is a dataclass whose fields carry their help (``metadata={"help": ...}``, as HF's
``TrainingArguments``): :class:`OptimizerSettings` (AdamW without its learning rates, which
each loop names its own way), :class:`ScheduleSettings` (the tri-stage schedule of
:mod:`ser_ray.training.schedule`), :class:`BatchSettings` (micro-batches, accumulation,
epochs, streaming window) and :class:`RuntimeSettings` (AMP, seed). :class:`LoopSettings`
composes them by inheritance, so the configs built on it (``TrainConfig`` for fine-tuning,
``PretrainConfig`` for pre-training) stay flat: ``to_dict()`` / ``from_dict()`` use the plain
field names that ``best.json``, Tune's param space, checkpoints and ``config.json`` hold.

A config whose default differs from the group's (pre-training's AdamW betas, say) redeclares
the field with :func:`default`, which keeps the group's help unless given another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from ser_ray.models.precision import AMP_MODES


def default(group: type, name: str, value: Any, help: str | None = None) -> Any:
    """The field ``name`` of the settings dataclass ``group`` with another default ``value``
    (and, if given, another ``help``): for a config that redeclares a shared field."""
    base = {f.name: f for f in dataclasses.fields(group)}[name]
    metadata = {**base.metadata, **({"help": help} if help is not None else {})}
    return dataclasses.field(default=value, metadata=metadata)


@dataclasses.dataclass
class OptimizerSettings:
    """AdamW (its peak learning rates are the loop's own fields) and gradient clipping."""

    weight_decay: float = dataclasses.field(
        default=0.01, metadata={"help": "AdamW decoupled weight decay (not on biases/norms)"}
    )
    betas: tuple[float, float] = dataclasses.field(
        default=(0.9, 0.999), metadata={"help": "AdamW (beta1, beta2)"}
    )
    eps: float = dataclasses.field(default=1e-8, metadata={"help": "AdamW epsilon"})
    grad_clip_norm: float | None = dataclasses.field(
        default=None, metadata={"help": "clip the global grad norm to this value; None = off"}
    )


@dataclasses.dataclass
class ScheduleSettings:
    """The tri-stage schedule of :mod:`ser_ray.training.schedule` (see its docstring)."""

    warmup_frac: float = dataclasses.field(
        default=0.1, metadata={"help": "fraction of steps of linear warm-up"}
    )
    decay_start_frac: float = dataclasses.field(
        default=0.7, metadata={"help": "fraction of steps after which the LR decays"}
    )
    final_lr_scale: float = dataclasses.field(
        default=0.05, metadata={"help": "LR at the last step, as a fraction of the peak"}
    )
    decay_shape: str = dataclasses.field(
        default="linear", metadata={"help": "decay shape: linear, cosine or exponential"}
    )


@dataclasses.dataclass
class BatchSettings:
    """Micro-batches, accumulation, epochs and how much a streaming worker holds."""

    batch_size: int = dataclasses.field(default=8, metadata={"help": "clips per micro-batch"})
    grad_accum_steps: int = dataclasses.field(
        default=1, metadata={"help": "micro-batches per optimizer step"}
    )
    epochs: int = dataclasses.field(
        default=10, metadata={"help": "passes over the training clips (at most)"}
    )
    window_clips: int = dataclasses.field(
        default=1024,
        metadata={
            "help": "clips a Ray Train worker holds at once while it streams its split (batches "
            "are length-grouped and shuffled within a window); at least the split's size gives "
            "the same batches as holding the whole split"
        },
    )


@dataclasses.dataclass
class RuntimeSettings:
    """Where numbers come from: mixed precision and the seed."""

    amp: str = dataclasses.field(
        default="auto", metadata={"help": "auto (bf16/fp16 on CUDA, off on CPU), bf16, fp16, off"}
    )
    seed: int = dataclasses.field(
        default=0,
        metadata={"help": "seed of init, data order and random draws; rank r draws with seed + r"},
    )


@dataclasses.dataclass
class LoopSettings(RuntimeSettings, BatchSettings, ScheduleSettings, OptimizerSettings):
    """What the settings of both loops share (``TrainConfig``, ``PretrainConfig``): the
    groups above, plain-dict round trips (JSON, Tune) and the checks common to both."""

    #: Old names of renamed fields -> their names now: what a saved ``config.json`` or a
    #: ``--params`` file written before the rename holds is read as the new field.
    RENAMED: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # lists arrive from JSON / Tune
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if min(self.grad_accum_steps, self.batch_size, self.epochs, self.window_clips) < 1:
            raise ValueError("grad_accum_steps, batch_size, epochs and window_clips must be >= 1")

    @classmethod
    def current_names(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` with every old field name (:attr:`RENAMED`) read as its new one; where
        both are given, the new name's value wins."""
        old = {cls.RENAMED[k]: v for k, v in values.items() if k in cls.RENAMED}
        return {**old, **{k: v for k, v in values.items() if k not in cls.RENAMED}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """Build from a dict (old field names read as the new ones), ignoring keys that are
        not settings."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cls.current_names(values).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """Every field by its plain name (the shape of ``config.json`` and Tune configs)."""
        return dataclasses.asdict(self)

    def schedule(self) -> ScheduleSettings:
        """The schedule fields alone (what :class:`ser_ray.training.engine.Engine` takes)."""
        return ScheduleSettings(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(ScheduleSettings)}
        )
