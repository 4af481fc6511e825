"""Named model variants of the study: ``family`` then ``+option`` suffixes (pure, no Ray).

``svm`` (MFCC statistics), ``svm+spknorm`` (speaker-normalised), ``svm+egemaps`` (eGeMAPSv02
functionals), ``svm+mfcc+egemaps+spknorm`` (both feature sets, speaker-normalised) and
``wav2vec2`` (the fine-tuned encoder of ``--model``). Names are canonical: options in a fixed
order, so that one variant has one name.

>>> parse_variant("svm+spknorm+egemaps").name
'svm+egemaps+spknorm'
>>> [v.name for v in parse_variants("svm, svm+spknorm,wav2vec2")]
['svm', 'svm+spknorm', 'wav2vec2']
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ser_ray.features import speaker_norm

FAMILIES = ("svm", "wav2vec2")
#: Options each family takes; feature-set options of the SVM name the Parquet columns it uses.
OPTIONS = {"svm": ("mfcc", "egemaps", "spknorm"), "wav2vec2": ()}
DEFAULT_VARIANTS = ("svm", "svm+spknorm", "wav2vec2")


@dataclasses.dataclass(frozen=True)
class Variant:
    family: str  # svm | wav2vec2
    feature_set: str = "mfcc"  # the SVM's features: mfcc | egemaps | mfcc+egemaps
    speaker_norm: bool = False  # per-actor z-normalisation of the SVM's features

    @property
    def name(self) -> str:
        if self.family != "svm":
            return self.family
        features = "" if self.feature_set == "mfcc" else f"+{self.feature_set}"
        return f"svm{features}{'+spknorm' if self.speaker_norm else ''}"

    def describe(self) -> dict[str, Any]:
        """What the variant is, for summary.json / config.json."""
        if self.family != "svm":
            return {"family": self.family}
        return {
            "family": self.family,
            "features": self.feature_set,
            "normalisation": speaker_norm.DESCRIPTION if self.speaker_norm else speaker_norm.NONE,
        }


def parse_variant(name: str) -> Variant:
    """``"svm+egemaps+spknorm"`` -> :class:`Variant`; unknown families/options raise."""
    family, *options = [part.strip() for part in name.strip().split("+")]
    if family not in FAMILIES:
        raise ValueError(f"variant {name!r}: unknown model family {family!r}; choose {FAMILIES}")
    unknown = sorted(set(options) - set(OPTIONS[family]))
    if unknown:
        raise ValueError(
            f"variant {name!r}: unknown option(s) {unknown} for {family}; it takes "
            f"{list(OPTIONS[family]) or 'none'}"
        )
    if family != "svm":
        return Variant(family)
    feature_set = "+".join(f for f in ("mfcc", "egemaps") if f in options) or "mfcc"
    return Variant(family, feature_set=feature_set, speaker_norm="spknorm" in options)


def parse_variants(text: str | tuple[str, ...] | list[str]) -> tuple[Variant, ...]:
    """A comma-separated list (or sequence) of names -> variants, in order, without repeats."""
    names = text.split(",") if isinstance(text, str) else list(text)
    variants = tuple(parse_variant(n) for n in names if n.strip())
    if not variants:
        raise ValueError("no variants given; e.g. svm,svm+spknorm,wav2vec2")
    seen = [v.name for v in variants]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:
        raise ValueError(f"variants {repeated} are given twice")
    if sum(v.family == "wav2vec2" for v in variants) > 1:
        raise ValueError("at most one wav2vec2 variant per run")
    return variants
