"""Settings of one fine-tuning run, and the model they describe.

:class:`TrainConfig` holds every setting with its default and what it does (a dataclass with
help on each field, as in HF ``TrainingArguments``); :func:`build_model` makes the classifier
a run of those settings trains. Both are shared by the loop (:mod:`ser_ray.training.finetune`), the
feature cache (:mod:`ser_ray.distributed.feature_cache`), the Ray edge
(:mod:`ser_ray.distributed.fold_trainer`) and the sweeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ser_ray.models.ssl import RANDOM_DEMO_MODEL, PartwiseClassifier, load_model
from ser_ray.training.class_weights import AUTO_BALANCE_RATIO, CLASS_WEIGHT_MODES
from ser_ray.training.settings import LoopSettings

#: The encoder configs' dropout probabilities (every supported family names them so).
ENCODER_DROPOUTS = (
    "hidden_dropout",
    "attention_dropout",
    "activation_dropout",
    "feat_proj_dropout",
)


@dataclasses.dataclass
class TrainConfig(LoopSettings):
    """Settings of one fine-tuning run (one outer fold). Defaults suit a pretrained encoder.

    The optimizer, schedule, batch and runtime fields shared with pre-training come from
    :class:`ser_ray.training.settings.LoopSettings`; the fields are flat (``to_dict()``).
    """

    #: ``n_val_actors`` was RAVDESS's word for what every corpus calls speakers.
    RENAMED: ClassVar[Mapping[str, str]] = {"n_val_actors": "n_val_speakers"}

    # model
    model: str | None = dataclasses.field(
        default=RANDOM_DEMO_MODEL,
        metadata={
            "help": "hub id or local folder (from_pretrained) of a wav2vec2, HuBERT, WavLM or "
            "data2vec-audio encoder (facebook/wav2vec2-base, microsoft/wavlm-large, a "
            "jobs/pretrain.py output, ...), 'demo' (the demo-size encoder pre-trained on the "
            "package's unlabeled pool, built and cached on first use; a job resolves it to that "
            "folder) or 'demo-random' (the same, random weights). None, for a job to decide "
            "(jobs/kfold.py: demo without --data-dir, facebook/wav2vec2-base with it; there "
            "also one per family: wav2vec2=X,wavlm=Y)"
        },
    )
    probe: bool = dataclasses.field(
        default=False, metadata={"help": "freeze the whole encoder; train the head only"}
    )
    use_weighted_layer_sum: bool = dataclasses.field(
        default=True, metadata={"help": "learnable softmax-weighted sum of all hidden layers"}
    )
    standardize_head_inputs: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "z-normalise the head's input (pooled, layer-summed hidden states) with "
            "its mean and std over the training clips under the initial encoder; folded into "
            "the projector when the model is saved (a standard checkpoint). Without it the "
            "head underfits: pooled states vary little between clips"
        },
    )
    head_dropout: float = dataclasses.field(
        default=0.1,
        metadata={"help": "dropout after the projector, in training only (not in the checkpoint)"},
    )
    freeze_feature_encoder: bool = dataclasses.field(
        default=True, metadata={"help": "freeze the CNN feature encoder (wav2vec 2.0 paper)"}
    )
    freeze_encoder_steps: int = dataclasses.field(
        default=0, metadata={"help": "train only the head for the first N optimizer steps"}
    )
    head_warmup_epochs: int = dataclasses.field(
        default=20,
        metadata={
            "help": "linear probing before fine-tuning (LP-FT, Kumar et al. 2022): train the "
            "head alone for N epochs on the training clips' pooled layer states under the "
            "initial encoder (computed once, held in memory: clips x layers x hidden floats), "
            "then fine-tune from that head; 0 = off (the head starts from random). A probe "
            "trains its head anyway and skips it. On the demo corpus 20 epochs moved every "
            "fold up (docs/ssl_recipe.md)"
        },
    )
    head_warmup_lr: float = dataclasses.field(
        default=3e-3, metadata={"help": "peak LR of the head warm-up (head_warmup_epochs)"}
    )
    spec_augment: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "SpecAugment masking of the encoder's frames while fine-tuning (the model "
            "config's mask_time_prob, or --mask-time-prob). Off by default: on the demo corpus "
            "it cost 6 to 16 UA points per fold (docs/ssl_recipe.md)"
        },
    )
    mask_time_prob: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "SpecAugment time-mask probability with spec_augment; None keeps the model "
            "config's"
        },
    )
    encoder_dropout: float | None = dataclasses.field(
        default=0.0,
        metadata={
            "help": "dropout inside the encoder (hidden, attention, activation, feature "
            "projection) while fine-tuning; None keeps the model config's (0.1 for "
            "wav2vec2-base). 0 by default: it buries the small clip-to-clip spread of pooled "
            "states (docs/ssl_recipe.md)"
        },
    )
    # optimizer (AdamW; weight decay, betas, eps, clipping: OptimizerSettings)
    lr_encoder: float = dataclasses.field(
        default=5e-5,
        metadata={
            "help": "peak LR of the encoder (published range 1e-5..1e-4)",
            "flag": "--lr",
        },
    )
    lr_head: float = dataclasses.field(default=1e-3, metadata={"help": "peak LR of the head"})
    # data (micro-batches, accumulation, epochs, streaming window: BatchSettings)
    eval_batch_size: int = dataclasses.field(
        default=16, metadata={"help": "clips per batch in evaluation"}
    )
    length_group_factor: int = dataclasses.field(
        default=50, metadata={"help": "sort by length within windows of this many batches"}
    )
    early_stopping_patience: int | None = dataclasses.field(
        default=5, metadata={"help": "stop after N epochs without a better val UA; None = off"}
    )
    merge_calm: bool = dataclasses.field(
        default=False, metadata={"help": "7 classes: calm merged into neutral (8 otherwise)"}
    )
    n_val_speakers: int = dataclasses.field(
        default=4, metadata={"help": "validation speakers taken from the training side; 0 = none"}
    )
    use_feature_cache: bool = dataclasses.field(
        default=True, metadata={"help": "reuse the frozen CNN's (probe: all layers') outputs"}
    )
    refit: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "after choosing the best epoch on the validation speakers, retrain from "
            "scratch on fit + validation speakers for that many epochs and test that model "
            "(as the SVM refits on all training speakers)"
        },
    )
    class_weight: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "class-weighted cross-entropy for imbalanced corpora (fine-tuning, probes "
            "and the head warm-up; the SVMs' class_weight too): balanced (each class weighted "
            "n / (classes x its training clips)), none, or auto: balanced when the largest "
            f"training class has more than {AUTO_BALANCE_RATIO:g}x the clips of the smallest "
            "(RAVDESS, 2x, stays unweighted; an SVM then searches both, as its grid always "
            "did). Measured in docs/results.md",
            "choices": list(CLASS_WEIGHT_MODES),
        },
    )
    progress_every_s: float = dataclasses.field(
        default=60.0,
        metadata={
            "help": "inside a long epoch, a progress line (step k/N, clips/s, running loss, "
            "ETA; validation likewise) at most every N seconds, the first after N seconds: "
            "an epoch shorter than that prints none; 0 = never"
        },
    )
    # runtime (amp, seed: RuntimeSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError("grad_clip_norm must be > 0 (or None to turn clipping off)")
        if self.use_feature_cache and not self.freeze_feature_encoder:
            raise ValueError("the feature cache needs a frozen CNN (freeze_feature_encoder=True)")
        if self.class_weight not in CLASS_WEIGHT_MODES:
            raise ValueError(
                f"class_weight must be one of {CLASS_WEIGHT_MODES}, got {self.class_weight!r}"
            )
        if self.head_warmup_epochs < 0 or self.head_warmup_lr <= 0:
            raise ValueError(
                f"head_warmup_epochs must be >= 0 and head_warmup_lr > 0, got "
                f"{self.head_warmup_epochs} and {self.head_warmup_lr}"
            )


def build_model(cfg: TrainConfig, class_names: Sequence[str]) -> tuple[PartwiseClassifier, Any]:
    """The classifier (a standard HF audio classifier, run in parts) and feature extractor
    a run of ``cfg`` trains (seeded head)."""
    overrides: dict[str, Any] = {"apply_spec_augment": cfg.spec_augment}
    if cfg.mask_time_prob is not None:
        overrides["mask_time_prob"] = cfg.mask_time_prob
    if cfg.encoder_dropout is not None:
        overrides.update(dict.fromkeys(ENCODER_DROPOUTS, cfg.encoder_dropout))
    model, fe = load_model(
        cfg.model,
        class_names,
        use_weighted_layer_sum=cfg.use_weighted_layer_sum,
        freeze_feature_encoder=cfg.freeze_feature_encoder or cfg.probe,
        seed=cfg.seed,
        **overrides,
    )
    runner = PartwiseClassifier(model, fe.return_attention_mask, cfg.head_dropout)
    if cfg.probe:
        runner.freeze_encoder()
    return runner, fe
