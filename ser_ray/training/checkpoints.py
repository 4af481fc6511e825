"""Fine-tuning checkpoints: everything a restarted run needs to continue bit for bit (no Ray).

A checkpoint folder holds ``model/`` (latest weights, an HF checkpoint), ``best_model/``
(best-epoch weights so far), ``train_state.pt`` (optimizer, schedule, scaler and the loop's
:class:`TrainState`, written with :func:`ser_ray.training.engine.write_train_state`) and one
``rng_rank<r>.pt`` per DDP rank (each rank draws its own dropout masks). Every rank writes
into the same folder; Ray Train merges the ranks' files into one checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
from torch import nn

from ser_ray.models.ssl import save_model
from ser_ray.training import engine as eng

RNG_STATE_FILE = "rng_rank{rank}.pt"  # one per DDP rank
MODEL_DIR = "model"  # latest weights (HF checkpoint)
BEST_MODEL_DIR = "best_model"  # best-epoch weights (HF checkpoint)


@dataclasses.dataclass
class TrainState:
    """Progress saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best_uar: float = -math.inf
    best_epoch: int = 0  # 1-based; 0 = none yet
    epochs_since_best: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def write_checkpoint(
    out_dir: str | os.PathLike,
    *,
    model: nn.Module,
    feature_extractor,
    engine: eng.Engine,
    state: TrainState,
    best_weights: dict[str, torch.Tensor] | None,
    rank: int = 0,
) -> Path:
    """Latest and best weights (HF), the engine's state and ``state`` (rank 0 writes these),
    and this rank's RNG states (every rank)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(eng.rng_states(), out / RNG_STATE_FILE.format(rank=rank))
    if rank != 0:
        return out
    core = eng.unwrap(model)
    save_model(core.model, feature_extractor, out / MODEL_DIR)
    if best_weights is not None:
        from safetensors.torch import save_file

        best_dir = out / BEST_MODEL_DIR
        best_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in best_weights.items()}
        save_file(tensors, str(best_dir / "model.safetensors"), metadata={"format": "pt"})
        core.model.config.save_pretrained(best_dir)
        feature_extractor.save_pretrained(best_dir)
    eng.write_train_state(out, engine, dataclasses.asdict(state))
    return out


def load_checkpoint(
    ckpt_dir: str | os.PathLike, *, model: nn.Module, engine: eng.Engine, rank: int = 0
) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """Restore a checkpoint written by :func:`write_checkpoint` into ``model`` and ``engine``
    (with this rank's RNG states); returns the progress and the best weights so far."""
    ckpt = Path(ckpt_dir)
    rng_file = ckpt / RNG_STATE_FILE.format(rank=rank)
    if not rng_file.exists():
        saved_ranks = sorted(p.name for p in ckpt.glob(RNG_STATE_FILE.format(rank="*")))
        raise FileNotFoundError(
            f"{ckpt} holds no RNG states for rank {rank} (it has {saved_ranks}); resume with "
            "the number of workers that wrote it"
        )
    eng.load_weights(eng.unwrap(model).model, ckpt / MODEL_DIR)
    progress = eng.load_train_state(ckpt, engine)
    eng.set_rng_states(torch.load(rng_file, weights_only=False))  # this rank's, not rank 0's
    best = None
    if (ckpt / BEST_MODEL_DIR).is_dir():
        best = eng.read_safetensors(ckpt / BEST_MODEL_DIR)
    return TrainState(**progress), best
