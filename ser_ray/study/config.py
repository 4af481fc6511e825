"""The study's settings: :class:`KFoldConfig` (saved as ``config.json``), the SSL training
settings it starts from (:func:`study_train_config`), and which encoder each SSL family runs
(``--model``: :func:`model_entries`, :data:`ser_ray.models.ssl.DEFAULT_MODELS`).

Apart from the driver (:mod:`ser_ray.study.kfold`) so that the flags (``jobs/kfold.py``), the
``--params`` file (:mod:`ser_ray.study.params`) and the resource plan read one declaration
without the study's run logic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ser_ray.common.errors import SettingsError
from ser_ray.corpus.clips import UNKNOWN_SPEAKER
from ser_ray.corpus.protocol import ProtocolSettings
from ser_ray.models import svm_approx
from ser_ray.models.ssl import DEFAULT_MODELS, FAMILIES
from ser_ray.study.variants import DEFAULT_VARIANTS, parse_variants
from ser_ray.training.config import TrainConfig

#: TrainConfig fields the study always sets from its own settings (``KFoldConfig.train``);
#: a ``--params`` file cannot change them.
STUDY_FIELDS = ("model", "epochs", "batch_size", "merge_calm", "seed", "refit")


#: A probe's defaults where the study's flags leave them at the study's: its head alone learns,
#: from standardised pooled layers, and needs more and larger steps than fine-tuning's
#: (docs/ssl_recipe.md: 47.8 -> 53.6 UA on the demo corpus, in-process).
PROBE_DEFAULTS: dict[str, Any] = {"epochs": 20, "lr_head": 3e-3, "head_dropout": 0.0}


def study_train_config(**changes: Any) -> TrainConfig:
    """The study's default SSL training settings: TrainConfig's, but 8 epochs and no model yet
    (``None``: :meth:`KFoldConfig.model_for` decides), with ``changes`` on top."""
    return TrainConfig(**{"model": None, "epochs": 8, **changes})


@dataclasses.dataclass
class KFoldConfig:
    """Settings of the study (the resolved copy is saved as ``config.json``)."""

    data_dir: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "the corpus: a RAVDESS or CREMA-D-named folder (local or URI), a clip "
            "manifest (CSV/JSONL: path, speaker, emotion, ...), or a datasets save_to_disk "
            "copy (default: the demo corpus)"
        },
    )
    manifest: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "a clip manifest, CSV or JSONL: path, speaker, emotion (or label); "
            "optional gender, session, fold, split, corpus; paths relative to the file "
            "allowed (the same as --data-dir FILE)"
        },
    )
    train: TrainConfig = dataclasses.field(
        default_factory=study_train_config,
        metadata={
            "help": "SSL training settings of every fold: TrainConfig defaults < the "
            "--params file < the study's own (STUDY_FIELDS, and any field changed from its "
            "default, e.g. --lr)"
        },
    )
    test_data_dir: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={
            "help": "cross-corpus: comma-separated corpora (folders, as --data-dir) each fold "
            "model of every variant is tested on, over the classes shared with the study"
        },
    )
    test_manifest: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={"help": "cross-corpus: comma-separated clip manifests, as --test-data-dir"},
    )
    speaker_regex: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "an EmoBox data file names no speaker: this regular expression finds it "
            "in each key (or wav path), its first group"
        },
    )
    unknown_speaker: str = dataclasses.field(
        default=UNKNOWN_SPEAKER,
        metadata={
            "help": "the manifest speaker value that means 'not known' (any case; an empty "
            "speaker too): each such clip is its own speaker, never grouped with the others, "
            "and out of the speaker-disjointness checks (docs/corpora.md)"
        },
    )
    protocol: ProtocolSettings = dataclasses.field(
        default_factory=ProtocolSettings,
        metadata={
            "help": "how folds, validation speakers and classes are resolved (saved as "
            "protocol.json); --merge-calm, the validation speakers (n_val_speakers) and the "
            "seed come from the training settings"
        },
    )
    variants: tuple[str, ...] = dataclasses.field(
        default=DEFAULT_VARIANTS,
        metadata={
            "help": "comma-separated named variants, compared with the first: a family (svm, "
            "wav2vec2, hubert, wavlm, data2vec-audio) then +options; svm takes +spknorm "
            "(speaker normalisation), +egemaps, +mfcc+egemaps (feature sets; default MFCC); "
            "an SSL family is fine-tuned, or with +probe its frozen encoder's pooled layers "
            "feed a trained head (+probe+spknorm: normalised per speaker first)"
        },
    )
    params: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "best.json of jobs/tune_adamw.py --nested (per-fold AdamW settings); a "
            "single-fold sweep's file is refused: its settings saw the other folds' test speakers"
        },
    )
    allow_leaky_params: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "accept a single-fold sweep's settings for every fold anyway (summary.md "
            "says so in bold)"
        },
    )
    workers_per_fold: int = dataclasses.field(
        default=1, metadata={"help": "Ray Train workers (DDP) per fold"}
    )
    concurrent_folds: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "folds trained at once (default: the resource plan's, as many as fit with "
            "whole CPUs per worker)"
        },
    )
    gpus_per_fold: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "GPUs per fold, fractions allowed (0.16: six folds share one GPU). "
            "Default: the cluster's GPUs shared over the folds, 0 without GPUs"
        },
    )
    cpus_per_worker: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "CPUs per Ray Train worker, also its torch threads (default: the resource "
            "plan's, whole CPUs, a fair share over the folds)"
        },
    )
    max_failures: int = dataclasses.field(
        default=2,
        metadata={
            "help": "restarts of a fold's training process (its Tune trial, or a TorchTrainer "
            "worker) before the fold fails"
        },
    )
    svm_search: str = dataclasses.field(
        default="grid",
        metadata={"help": "SVM search: grid, or bayes (Optuna TPE)", "choices": ["grid", "bayes"]},
    )
    svm_num_samples: int = dataclasses.field(
        default=20, metadata={"help": "Bayesian SVM trials per fold"}
    )
    svm_solver: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "SVM solver: exact (kernel SVC, cost ~n^1.8), approx (Nystroem kernel "
            "approximation + ridge classifier, successive-halving grid, cost ~n), or auto: "
            "approx when an outer fold trains on more than --svm-approx-min-clips clips",
            "choices": list(svm_approx.SOLVERS),
        },
    )
    svm_approx_min_clips: int = dataclasses.field(
        default=svm_approx.APPROX_MIN_CLIPS,
        metadata={"help": "--svm-solver auto: training clips per fold above which approx runs"},
    )
    svm_approx_components: int = dataclasses.field(
        default=svm_approx.N_COMPONENTS,
        metadata={"help": "Nystroem components of the approx SVM solver"},
    )
    tapt_epochs: int = dataclasses.field(
        default=0,
        metadata={
            "help": "task-adaptive pre-training: before fine-tuning, continue each fold's "
            "self-supervised pre-training for N epochs on its training speakers' audio (cached); "
            "0 = off"
        },
    )
    cluster_wait_s: float = dataclasses.field(
        default=600.0,
        metadata={
            "help": "on a joined cluster, how long to wait for the CPUs/GPUs that "
            "--concurrent-folds and --gpus-per-fold ask for (an autoscaler adds nodes) before "
            "giving up"
        },
    )
    stall_timeout_s: float = dataclasses.field(
        default=3600.0,
        metadata={
            "help": "an SSL fold without a new epoch result or progress line (inside a long "
            "epoch, every --progress-every-s) for this many seconds fails the run, naming the "
            "fold (a stuck trial never hangs the job); 0 = never"
        },
    )
    storage_path: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "deprecated: Tune/Train state, which lives in the run location (OUT/ray) "
            "by default; give --out on a shared folder or a URI instead"
        },
    )
    resume: bool = dataclasses.field(
        default=False,
        metadata={"help": "continue an interrupted run in the same --out"},
    )
    out: str = dataclasses.field(
        default="runs/kfold",
        metadata={
            "help": "the run location: a local folder (one machine), a folder every node "
            "mounts, or a URI (s3://bucket/run, gs://...) on a cluster"
        },
    )
    smoke_test: bool = dataclasses.field(
        default=False, metadata={"help": "tiny corpus, one epoch, small SVM grid"}
    )

    def model_for(self, family: str = "wav2vec2") -> str:
        """The encoder of the SSL ``family``: its ``family=X`` entry of ``--model``, else a
        plain ``--model X``, else ``demo`` (wav2vec2 on the demo corpus) or
        :data:`DEFAULT_MODELS`."""
        given = model_entries(self.train.model)
        if family in given:
            return given[family]
        if None in given:
            return given[None]
        if family == "wav2vec2" and self.source is None:
            return "demo"
        return DEFAULT_MODELS[family]

    @property
    def source(self) -> str | None:
        """The corpus given (``--data-dir`` or ``--manifest``), None for the demo corpus."""
        return self.manifest or self.data_dir

    def protocol_settings(self, n_val_speakers: int) -> ProtocolSettings:
        """``protocol`` with the study's own calm merge and seed, and ``n_val_speakers``."""
        return dataclasses.replace(
            self.protocol,
            merge_calm=self.train.merge_calm,
            seed=self.train.seed,
            n_val_speakers=n_val_speakers,
        )

    def __post_init__(self) -> None:
        self.variants = tuple(v.name for v in parse_variants(self.variants))  # raises
        if self.svm_search not in ("grid", "bayes"):
            raise SettingsError(f"svm_search={self.svm_search!r}: choose grid or bayes")
        if self.svm_solver not in svm_approx.SOLVERS:
            raise SettingsError(
                f"svm_solver={self.svm_solver!r}: choose one of {', '.join(svm_approx.SOLVERS)}"
            )
        if self.svm_approx_min_clips < 0 or self.svm_approx_components < 1:
            raise SettingsError(
                f"--svm-approx-min-clips {self.svm_approx_min_clips} must be >= 0 and "
                f"--svm-approx-components {self.svm_approx_components} >= 1"
            )
        if self.manifest and self.data_dir:
            raise SettingsError(
                f"--manifest {self.manifest} and --data-dir {self.data_dir}: give one corpus"
            )
        if self.train.class_weight != "auto" and self.svm_search == "bayes":
            svms = [v.name for v in parse_variants(self.variants) if not v.is_ssl]
            if svms:
                raise SettingsError(
                    f"--class-weight {self.train.class_weight} fixes the SVMs' class weighting "
                    f"in the grid search; the bayes search of {svms} chooses it itself: use "
                    "--svm-search grid, or leave --class-weight at auto"
                )
        if self.tapt_epochs < 0:
            raise SettingsError(f"tapt_epochs must be >= 0, got {self.tapt_epochs}")
        model_entries(self.train.model)  # raises


def model_entries(text: str | None) -> dict[str | None, str]:
    """``--model`` as ``{family: model}``; a plain entry (no ``family=``) under ``None``.

    >>> model_entries("demo,wavlm=microsoft/wavlm-large")
    {None: 'demo', 'wavlm': 'microsoft/wavlm-large'}
    """
    entries: dict[str | None, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        family, _, model = part.partition("=") if "=" in part else (None, "", part)
        family = family.strip() if family is not None else None
        if family is not None and family not in FAMILIES:
            raise SettingsError(
                f"--model {text!r}: {family!r} is not an SSL family; name one of "
                f"{list(FAMILIES)} (e.g. wavlm=microsoft/wavlm-large)"
            )
        if family in entries:
            raise SettingsError(f"--model {text!r} names the encoder of {family or 'all'} twice")
        entries[family] = model.strip()
    return entries
