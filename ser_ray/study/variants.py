"""Named model variants of the study: ``family`` then ``+option`` suffixes (pure, no Ray).

SVMs: ``svm`` (MFCC statistics), ``svm+spknorm`` (speaker-normalised), ``svm+egemaps``
(eGeMAPSv02 functionals), ``svm+mfcc+egemaps+spknorm`` (both feature sets,
speaker-normalised), ``svm+ssl[+spknorm]`` (a frozen SSL encoder's mean-pooled hidden layers,
concatenated: wav2vec2's encoder of ``--model``, or a plain ``--model``'s of any family). SSL
encoders, named by their family (``wav2vec2``, ``hubert``, ``wavlm``, ``data2vec-audio``; the
encoder of ``--model`` must be of that family):
``wav2vec2`` (fine-tuned), ``wav2vec2+probe`` (frozen encoder, a head trained on its pooled
layers: the EmoBox / SUPERB protocol) and ``wav2vec2+probe+spknorm`` (the pooled layers
z-normalised per speaker first). Names are canonical: options in a fixed order, so that one
variant has one name.

>>> parse_variant("svm+spknorm+egemaps").name
'svm+egemaps+spknorm'
>>> parse_variant("wavlm+spknorm+probe").name
'wavlm+probe+spknorm'
>>> parse_variant("svm+spknorm+ssl").name
'svm+ssl+spknorm'
>>> [v.name for v in parse_variants("svm, svm+spknorm,wav2vec2")]
['svm', 'svm+spknorm', 'wav2vec2']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ser_ray.common.errors import SettingsError
from ser_ray.features import speaker_norm
from ser_ray.models.ssl import FAMILIES as SSL_FAMILIES
from ser_ray.models.svm import FEATURE_SETS, SSL_COLUMN

SVM = "svm"
FAMILIES = (SVM, *SSL_FAMILIES)
#: Options each family takes; feature-set options of the SVM name the Parquet columns it uses.
OPTIONS = {
    SVM: ("mfcc", "egemaps", "ssl", "spknorm"),
    **{f: ("probe", "spknorm") for f in SSL_FAMILIES},
}
DEFAULT_VARIANTS = ("svm", "svm+spknorm", "wav2vec2")
PROBE = "probe: frozen encoder, a head trained on its mean-pooled hidden layers"
FINE_TUNED = "fine-tuned: the encoder (its CNN frozen) and the head trained together"


@dataclasses.dataclass(frozen=True)
class Variant:
    family: str  # svm, or an SSL family (wav2vec2, hubert, wavlm, data2vec-audio)
    feature_set: str = "mfcc"  # the SVM's features: mfcc | egemaps | mfcc+egemaps | ssl
    speaker_norm: bool = False  # per-speaker z-normalisation of the features
    probe: bool = False  # SSL: frozen encoder, head only

    @property
    def is_ssl(self) -> bool:
        return self.family != SVM

    @property
    def uses_encoder(self) -> bool:
        """Whether the variant runs an SSL encoder (fine-tuned, probed, or as SVM features)."""
        return self.is_ssl or self.feature_set == "ssl"

    @property
    def name(self) -> str:
        spknorm = "+spknorm" if self.speaker_norm else ""
        if self.is_ssl:
            return f"{self.family}{'+probe' if self.probe else ''}{spknorm}"
        features = "" if self.feature_set == "mfcc" else f"+{self.feature_set}"
        return f"svm{features}{spknorm}"

    def describe(self) -> dict[str, Any]:
        """What the variant is, for summary.json / config.json."""
        normalisation = speaker_norm.DESCRIPTION if self.speaker_norm else speaker_norm.NONE
        if self.is_ssl:
            mode = PROBE if self.probe else FINE_TUNED
            return {"family": self.family, "mode": mode, "normalisation": normalisation}
        return {"family": self.family, "features": self.feature_set, "normalisation": normalisation}


def parse_variant(name: str) -> Variant:
    """``"svm+egemaps+spknorm"`` -> :class:`Variant`; unknown families/options raise."""
    family, *options = [part.strip() for part in name.strip().split("+")]
    if family not in FAMILIES:
        raise SettingsError(f"variant {name!r}: unknown model family {family!r}; choose {FAMILIES}")
    unknown = sorted(set(options) - set(OPTIONS[family]))
    if unknown:
        raise SettingsError(
            f"variant {name!r}: unknown option(s) {unknown} for {family}; it takes "
            f"{list(OPTIONS[family])}"
        )
    if family != SVM:
        if "spknorm" in options and "probe" not in options:
            raise SettingsError(
                f"variant {name!r}: +spknorm of an SSL encoder normalises its frozen pooled "
                f"layers, so it needs +probe ({family}+probe+spknorm)"
            )
        return Variant(family, speaker_norm="spknorm" in options, probe="probe" in options)
    if "ssl" in options and {"mfcc", "egemaps"} & set(options):
        raise SettingsError(
            f"variant {name!r}: +ssl takes the encoder's pooled layers alone; run "
            "svm+ssl and the MFCC/eGeMAPS variants side by side"
        )
    feature_set = "+".join(f for f in ("mfcc", "egemaps", "ssl") if f in options) or "mfcc"
    return Variant(family, feature_set=feature_set, speaker_norm="spknorm" in options)


def parse_variants(text: str | tuple[str, ...] | list[str]) -> tuple[Variant, ...]:
    """A comma-separated list (or sequence) of names -> variants, in order, without repeats."""
    names = text.split(",") if isinstance(text, str) else list(text)
    variants = tuple(parse_variant(n) for n in names if n.strip())
    if not variants:
        raise SettingsError("no variants given; e.g. svm,svm+spknorm,wav2vec2")
    seen = [v.name for v in variants]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:
        raise SettingsError(f"variants {repeated} are given twice")
    return variants


def svm_parquet_columns(variants: Sequence[Variant]) -> set[str]:
    """The features Parquet's columns the SVM variants read (``svm+ssl``'s pooled layers
    come from the encoder, not from the Parquet)."""
    columns = {c for v in variants if not v.is_ssl for c in FEATURE_SETS[v.feature_set]}
    return columns - {SSL_COLUMN}
