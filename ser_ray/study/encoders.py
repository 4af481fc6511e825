"""The encoder each variant runs: which one (``--model`` per family), whether it can be
loaded at all (checked before any work), and where every node reads it (the demo encoder
built, a folder published on a cluster, each fold's own after TAPT).
"""

from __future__ import annotations

import dataclasses

from ser_ray.common import storage
from ser_ray.common.errors import SettingsError
from ser_ray.corpus.protocol import Protocol
from ser_ray.distributed.published import published_model
from ser_ray.distributed.resources import plan_folds
from ser_ray.models.ssl import FAMILIES
from ser_ray.study.config import KFoldConfig
from ser_ray.study.variants import Variant
from ser_ray.training.config import TrainConfig


def with_encoders(
    train_cfgs: dict[int, TrainConfig],
    features_dir: str,
    cfg: KFoldConfig,
    protocol: Protocol,
    out: str,
) -> dict[int, TrainConfig]:
    """The fold configs with the encoder each fold trains: their model resolved (``demo``:
    the pre-trained demo encoder, built on first use; on a cluster, published where every
    node reads it) and, with ``--tapt-epochs``, each fold's own continued pre-training on its
    training speakers."""
    from ser_ray.distributed import tapt

    (model,) = {c.model for c in train_cfgs.values()}
    base = encoder_for_every_node(model, cfg, out)
    models = {k: base for k in train_cfgs}
    if cfg.tapt_epochs:
        models = tapt.run_tapt_folds(
            features_dir,
            base,
            list(train_cfgs),
            protocol=protocol,
            settings=tapt.tapt_config(base, cfg.tapt_epochs, cfg.train.seed, cfg.smoke_test),
            out_dir=storage.join(out, "tapt"),
            resources=plan_folds(cfg, len(train_cfgs)).train_resources(),
            max_failures=cfg.max_failures,
        )
    return {k: dataclasses.replace(c, model=models[k]) for k, c in train_cfgs.items()}


def encoder_of(cfg: KFoldConfig, variant: Variant) -> str:
    """The ``--model`` value of a variant that runs an encoder: its family's; ``svm+ssl``
    takes wav2vec2's (a plain ``--model X``: X, of any family)."""
    return cfg.model_for(variant.family if variant.is_ssl else "wav2vec2")


def encoder_for_every_node(model: str, cfg: KFoldConfig, out: str) -> str:
    """``model`` resolved (``demo``: the demo encoder's folder, built here on first use) and,
    on a cluster that spans nodes, published to the run location for every node."""
    from ser_ray.distributed.demo_encoder import resolve_model

    return published_model(resolve_model(model, cfg.smoke_test), out)


def check_model_reachable(model: str, family: str | None = "wav2vec2") -> None:
    """Stop at once when ``--model`` names neither a demo encoder, nor a folder, nor a hub
    id whose config can be fetched (offline, a hub id fails here, not after the features),
    or an encoder of another family than the variant's (the demo encoders are wav2vec2;
    ``family`` None: any SSL family)."""
    from transformers import AutoConfig

    from ser_ray.distributed.demo_encoder import RANDOM_DEMO_MODEL
    from ser_ray.models.ssl import DEMO_MODEL

    if model in (DEMO_MODEL, RANDOM_DEMO_MODEL):
        model_type = "wav2vec2"
    else:
        try:
            model_type = AutoConfig.from_pretrained(model).model_type
        except (OSError, ValueError) as err:
            raise SettingsError(
                f"--model {model!r}: no local folder and the hub cannot give its config "
                f"({err}). Point --model at a downloaded copy (a folder with config.json), or "
                "use --model demo offline"
            ) from err
    if family is None and model_type not in FAMILIES:
        raise SettingsError(
            f"svm+ssl would take the pooled layers of {model!r}, a {model_type} model: name "
            f"an encoder of one of {list(FAMILIES)} with --model"
        )
    if family is not None and model_type != family:
        raise SettingsError(
            f"the {family} variants would run {model!r}, a {model_type} encoder: name a "
            f"{family} encoder with --model {family}=<hub id or folder>, or name the variants "
            f"by the family that runs ({model_type}, {model_type}+probe, ...)"
        )
