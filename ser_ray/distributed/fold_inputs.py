"""What a fold's training reads: the features Parquet, or the frozen part's feature cache.

One builder for every consumer: the study's folds (:func:`fold_inputs_per_fold`, called by
:func:`ser_ray.distributed.ssl_folds.run_ssl_folds`), the AdamW sweep's trials
(:func:`ser_ray.sweeps.adamw.run_sweep`) and the tests (:func:`build_fold_inputs`). With
``use_feature_cache`` the cache (:mod:`ser_ray.distributed.feature_cache`) is built, or
reused, in the driver before any training starts (its Ray Data tasks need CPUs that running
folds would hold); whoever trains on it checks once, with :meth:`FoldInputs.check`, that
the cache was made by its model's frozen part.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from ser_ray.common import storage
from ser_ray.distributed import feature_cache
from ser_ray.features.featurize import load_features
from ser_ray.features.speaker_norm import SIDE_COLUMNS, normalisation_groups
from ser_ray.models.ssl import PartwiseClassifier
from ser_ray.training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class FoldInputs:
    """Where a fold's clips come from: ``source`` (a features or feature-cache Parquet
    folder, local or URI), its ``input_kind`` (``waveform``, ``cnn`` or ``pooled``), for
    a cache the key of the frozen part that made it, and whether its pooled layers are
    z-normalised per speaker."""

    source: str
    input_kind: str
    feature_cache_key: str | None
    speaker_norm: bool = False

    def check(self, model: PartwiseClassifier, feature_extractor) -> None:
        """Raise ``ValueError`` unless a cache was made by this model's frozen part (raw
        waveforms need no check)."""
        if self.input_kind == "waveform":
            return
        have = feature_cache.cache_key(model, feature_extractor, self.input_kind)
        if self.feature_cache_key != have:
            raise ValueError(
                f"the feature cache ({self.feature_cache_key}) was not made by this model's "
                f"frozen part ({have}); rebuild it or turn use_feature_cache off"
            )


def build_fold_inputs(
    features_dir: str | os.PathLike,
    train_config: TrainConfig,
    cache_root: str | os.PathLike,
    *,
    use_gpu: bool = False,
    speaker_norm: bool = False,
) -> FoldInputs:
    """The features folder itself or, with ``train_config.use_feature_cache``, the cache of
    its model's frozen part under ``cache_root`` (built here unless already there); with
    ``speaker_norm`` (a probe's) its pooled layers z-normalised per speaker."""
    if speaker_norm and not (train_config.probe and train_config.use_feature_cache):
        raise ValueError("speaker-normalised SSL inputs are a probe's cached pooled layers")
    if not train_config.use_feature_cache:
        return FoldInputs(storage.absolute(features_dir), "waveform", None)
    cache = feature_cache.build_feature_cache(
        features_dir, cache_root, train_config=train_config, use_gpu=use_gpu
    )
    if speaker_norm:
        cache = feature_cache.speaker_normalised_cache(cache, _normalisation_groups(features_dir))
    return FoldInputs(str(cache.path), cache.kind, cache.key, speaker_norm)


def _normalisation_groups(features_dir: str | os.PathLike) -> dict[str, object]:
    """Each clip's speaker-normalisation group by path (its speaker; an unknown speaker's
    clip: the unknown-speaker clips of its side), read from the features' own columns."""
    columns = ["path", "actor", "speaker", *SIDE_COLUMNS]
    frame = load_features(features_dir, columns)
    return dict(zip(frame["path"], normalisation_groups(frame), strict=True))


def fold_inputs_per_fold(
    features_dir: str | os.PathLike,
    train_cfgs: Mapping[int, TrainConfig],
    cache_root: str | os.PathLike,
    speaker_norm: bool = False,
) -> dict[int, FoldInputs]:
    """:func:`build_fold_inputs` of every fold. Folds with the same model share one cache;
    after TAPT every fold has its own encoder, CNN included, so each gets its own."""
    by_model: dict[tuple[str, bool, bool], FoldInputs] = {}
    inputs = {}
    for fold, train_cfg in sorted(train_cfgs.items()):
        model = (train_cfg.model, train_cfg.probe, train_cfg.use_feature_cache)
        if model not in by_model:
            by_model[model] = build_fold_inputs(
                features_dir, train_cfg, cache_root, speaker_norm=speaker_norm
            )
        inputs[fold] = by_model[model]
    return inputs
