"""What one fold's training is handed: one typed, frozen :class:`FoldWork`.

A study fold (its Tune trial, or each worker of its ``TorchTrainer``) and an AdamW trial
get the same object, pickled by Ray as it is, instead of a flat dict whose keys were listed
only in a docstring: a misspelt field fails where the object is made, not in a worker
minutes later. Ray Train wants its ``train_loop_config`` to be a dict, so a
``TorchTrainer`` carries the object under one key (:data:`WORK_KEY`), unwrapped in the
per-worker function alone (:func:`ser_ray.distributed.fold_trainer.train_fold_per_worker`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ser_ray.corpus.protocol import Protocol
from ser_ray.distributed.fold_inputs import FoldInputs
from ser_ray.training.clip_data import MODEL_NAME
from ser_ray.training.config import TrainConfig

#: The key of a ``TorchTrainer``'s ``train_loop_config`` that holds its fold's work.
WORK_KEY = "work"


@dataclasses.dataclass(frozen=True)
class FoldWork:
    """One fold's training: settings, inputs, which fold of which protocol, where its logs
    go, and (after :func:`ser_ray.distributed.fold_trainer.fold_data`) its clips counted."""

    #: The fine-tuning settings (encoder resolved; after TAPT the fold's own encoder).
    train: TrainConfig
    #: What the fold reads: the features Parquet or a feature cache, checked against the model.
    inputs: FoldInputs
    #: The outer fold's number (1-based) in ``protocol``.
    fold: int
    #: The study's resolved protocol: the fold's test, fit and validation speakers, classes.
    protocol: Protocol
    #: The variant's name: the ``model`` column of the fold's predictions.
    variant: str = MODEL_NAME
    #: TensorBoard folder of the fold (local or URI), or None for no events.
    log_dir: str | None = None
    #: Where the fold publishes progress lines inside long epochs, or None for none.
    progress_key: str | None = None
    #: Clips per split (``train``, ``val``, ``test``), counted before any worker reads a row:
    #: a stream's size sets an epoch's steps. None until counted.
    split_clips: Mapping[str, int] | None = None
    #: Clips per class of the ``train`` (fit) and ``val`` splits: the loss's class weights;
    #: empty when not counted (the loop then counts them itself).
    class_counts: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)

    def counted_splits(self) -> Mapping[str, int]:
        """``split_clips``; raises ``ValueError`` when they were not counted yet."""
        if self.split_clips is None:
            raise ValueError(f"fold {self.fold}: its clips were not counted (fold_data)")
        return self.split_clips
