"""The protocol of a study, resolved once: speaker-disjoint folds, each fold's validation
speakers and the class set (pure, no Ray).

:func:`resolve_protocol` turns a corpus (:class:`ser_ray.corpus.clips.ClipTable`) and the
:class:`ProtocolSettings` into a :class:`Protocol`; the study saves it as ``protocol.json`` and
hands the same object to every stage (features, SVMs, fine-tuning, TAPT, summary), which never
re-derive folds or classes from loose flags. A saved ``protocol.json`` given back
(``--protocol FILE``) makes two runs, or two tools, compare on the same folds.

Schemes (``--folds``):

- ``contiguous`` / ``emobox``: RAVDESS's six folds of four actors (blocks 1-4, 5-8, ...; or
  EmoBox's sets), for a corpus whose speakers are actors 1-24;
- ``speaker-kfold``: ``--num-folds`` speaker groups balanced by gender and clip count,
  deterministic by seed;
- ``session``: leave one session out (the manifest's ``session`` column, IEMOCAP style);
- ``predefined``: the manifest's ``fold`` (or ``split``) column; a ``split`` column that names
  sides (``train``, ``dev``, test sets under other names) gives the corpus's official
  partitions (resolved scheme ``partitions``): each test set is a fold whose training side is
  the train split and whose validation side is the dev split, so every stage runs over them
  as over folds, and no k-fold is made;
- ``auto`` (default): ``contiguous`` for a RAVDESS corpus, ``speaker-kfold`` otherwise.

Speakers are numbers inside (the features' ``actor`` column, see
:func:`ser_ray.corpus.clips.speaker_numbers`); ``protocol.json`` gives their names too. A clip
of an unknown speaker is a pseudo-speaker of its own (never a validation speaker), so the
speaker-disjointness checks hold for every known speaker and never group unknown clips.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ser_ray.common import storage
from ser_ray.common.errors import SettingsError
from ser_ray.corpus import folds as ravdess_folds
from ser_ray.corpus import ravdess, speaker_folds
from ser_ray.corpus.clips import ClipTable, clip_frame, is_unknown_speaker, speaker_numbers
from ser_ray.corpus.folds import FoldError

SCHEMES = ("auto", "contiguous", "emobox", "speaker-kfold", "session", "predefined")
RAVDESS_SCHEMES = tuple(ravdess_folds.FOLD_SCHEMES)
DROP = "-"  # a label map's target that drops the label's clips
PROTOCOL_VERSION = 1
#: The resolved scheme of a corpus's own partitions (``--folds predefined``, split sides).
PARTITIONS = "partitions"
#: :meth:`Protocol.fold_of_speaker`'s group of the given training and dev sides' speakers.
TRAIN_GROUP, DEV_GROUP = 0, -1


def parse_label_map(text: str | None, merge_calm: bool = False) -> dict[str, str | None]:
    """``"calm=neutral,surprised=-"`` -> ``{"calm": "neutral", "surprised": None}`` (None:
    the label's clips are left out of the study). ``merge_calm`` adds ``calm=neutral``.

    >>> parse_label_map("calm=neutral, surprised=-")
    {'calm': 'neutral', 'surprised': None}
    """
    mapping: dict[str, str | None] = {"calm": "neutral"} if merge_calm else {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        source, sep, target = (part.strip() for part in item.partition("="))
        if not sep or not source or not target:
            raise SettingsError(
                f"--label-map item {item.strip()!r}: write LABEL=CLASS (rename or merge) or "
                f"LABEL={DROP} (leave the label's clips out), comma-separated"
            )
        mapping[source] = None if target == DROP else target
    return mapping


@dataclasses.dataclass(frozen=True)
class ProtocolSettings:
    """How the protocol is resolved from a corpus (the study's flags)."""

    folds: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "fold scheme: auto (contiguous for RAVDESS, speaker-kfold otherwise), "
            "contiguous (RAVDESS actors 1-4, 5-8, ...), emobox (EmoBox's RAVDESS fold sets), "
            "speaker-kfold (--num-folds speaker groups balanced by gender and clips), session "
            "(leave one session out), predefined (the manifest's fold/split column)",
            "choices": list(SCHEMES),
        },
    )
    num_folds: int = dataclasses.field(
        default=6, metadata={"help": "folds of the speaker-kfold scheme"}
    )
    label_map: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "rename, merge or drop labels: 'calm=neutral,surprised=-' (- drops the "
            "label's clips; they are listed in rejected.csv)"
        },
    )
    merge_calm: bool = dataclasses.field(
        default=False, metadata={"help": "shorthand for --label-map calm=neutral"}
    )
    n_val_speakers: int = dataclasses.field(
        default=4,
        metadata={"help": "validation speakers per fold, taken from its training speakers"},
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of speaker-kfold"})
    protocol_file: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "a saved protocol.json: use its folds, validation speakers and classes",
            "flag": "--protocol",
        },
    )

    def __post_init__(self) -> None:
        if self.folds not in SCHEMES:
            raise SettingsError(f"folds={self.folds!r}: choose one of {', '.join(SCHEMES)}")
        parse_label_map(self.label_map)  # raises on a malformed map


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Folds (test speakers), each fold's validation speakers, and the classes, of one study.

    ``folds[k - 1]`` are fold k's test speakers (numbers); its training speakers are all the
    others, or ``training[k - 1]`` when given (official partitions: every test set trains on
    the train and dev splits); ``validation[k - 1]`` are taken from those. ``label_map`` sends
    every label of the corpus to its class (None: its clips are left out); ``classes`` are in
    index order.
    """

    scheme: str
    folds: tuple[tuple[int, ...], ...]
    validation: tuple[tuple[int, ...], ...]
    classes: tuple[str, ...]
    label_map: Mapping[str, str | None]
    speakers: Mapping[int, str]  # number -> the corpus's name
    fold_names: tuple[str, ...] = ()  # session, predefined fold or test set names; () if none
    training: tuple[tuple[int, ...], ...] = ()  # given training sides (partitions); () if none

    # -- folds ------------------------------------------------------------------------------
    @property
    def fold_numbers(self) -> list[int]:
        return list(range(1, len(self.folds) + 1))

    @property
    def given_sides(self) -> bool:
        """Whether the training and validation sides are given (official partitions), not
        the other folds."""
        return bool(self.training)

    def fold_of_speaker(self) -> dict[int, int]:
        """Speaker number -> fold number (1-based): the group the SVM's inner
        cross-validation leaves out in turn. With given sides, the training side's speakers
        are group :data:`TRAIN_GROUP` and the dev side's :data:`DEV_GROUP`, so that inner
        cross-validation fits on train and scores on dev (and the other way round)."""
        groups = {s: k for k, test in enumerate(self.folds, 1) for s in test}
        for k in range(len(self.training)):
            dev = set(self.validation[k])
            groups.update({s: DEV_GROUP if s in dev else TRAIN_GROUP for s in self.training[k]})
        return groups

    def test_and_train(self, fold: int) -> tuple[list[int], list[int]]:
        """(test speakers, training speakers) of one fold."""
        self._check_fold(fold)
        test = list(self.folds[fold - 1])
        if self.training:
            return test, sorted(self.training[fold - 1])
        train = sorted(s for k, group in enumerate(self.folds, 1) if k != fold for s in group)
        return test, train

    def split(self, fold: int) -> tuple[list[int], list[int], list[int]]:
        """(test speakers, training speakers without validation, validation speakers)."""
        test, train = self.test_and_train(fold)
        val = list(self.validation[fold - 1])
        fit = [s for s in train if s not in val]
        ravdess_folds.check_no_leakage(fit + val, test)
        return test, fit, val

    def _check_fold(self, fold: int) -> None:
        if not 1 <= fold <= len(self.folds):
            raise FoldError(f"fold {fold} does not exist; folds are 1..{len(self.folds)}")

    # -- labels -----------------------------------------------------------------------------
    def class_of(self, label: str) -> str | None:
        """The class of a corpus label (None: left out by the label map)."""
        if label not in self.label_map:
            raise SettingsError(
                f"label {label!r} is not one of the protocol's labels "
                f"{sorted(self.label_map)}; add it to --label-map"
            )
        return self.label_map[label]

    def class_indices(self, labels: Iterable[str]) -> list[int]:
        """Class index of each label (raises for a label the map leaves out)."""
        index = self.label_index()
        out = []
        for label in labels:
            if self.class_of(label) is None:
                raise ValueError(f"label {label!r} is left out by the label map; filter first")
            out.append(index[label])
        return out

    def label_index(self) -> dict[str, int]:
        """Corpus label -> class index, for every label the map keeps."""
        index = {name: i for i, name in enumerate(self.classes)}
        return {label: index[t] for label, t in self.label_map.items() if t is not None}

    @property
    def kept_labels(self) -> list[str]:
        """The corpus labels whose clips take part (not dropped by the label map)."""
        return sorted(label for label, target in self.label_map.items() if target is not None)

    @property
    def dropped_labels(self) -> list[str]:
        return sorted(label for label, target in self.label_map.items() if target is None)

    # -- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``protocol.json``): speakers by name and number, per fold its test,
        training and validation speakers."""
        names = self.speakers

        def named(speakers: list[int]) -> list[str]:
            return [names[s] for s in speakers]

        splits = {k: self.split(k) for k in self.fold_numbers}
        return {
            "version": PROTOCOL_VERSION,
            "scheme": self.scheme,
            "classes": list(self.classes),
            "label_map": dict(self.label_map),
            "speakers": {str(n): names[n] for n in sorted(names)},
            "folds": [
                {
                    "fold": k,
                    "name": self.fold_names[k - 1] if self.fold_names else str(k),
                    "test_speakers": named(test),
                    "validation_speakers": named(val),
                    "fit_speakers": named(fit),
                }
                for k, (test, fit, val) in splits.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Protocol:
        if data.get("version") != PROTOCOL_VERSION:
            raise SettingsError(
                f"protocol version {data.get('version')!r} is not {PROTOCOL_VERSION}; resolve "
                "the protocol again (run without --protocol)"
            )
        number = {name: int(n) for n, name in data["speakers"].items()}
        folds = data["folds"]
        named = any(f["name"] != str(f["fold"]) for f in folds)
        sides = ("fit_speakers", "validation_speakers")
        training = tuple(tuple(sorted(number[s] for side in sides for s in f[side])) for f in folds)
        return cls(
            scheme=data["scheme"],
            folds=tuple(tuple(sorted(number[s] for s in f["test_speakers"])) for f in folds),
            validation=tuple(
                tuple(sorted(number[s] for s in f["validation_speakers"])) for f in folds
            ),
            classes=tuple(data["classes"]),
            label_map=dict(data["label_map"]),
            speakers={n: name for name, n in number.items()},
            fold_names=tuple(f["name"] for f in folds) if named else (),
            training=training if data["scheme"] == PARTITIONS else (),
        )

    def save(self, path: str | Path) -> None:
        """``protocol.json`` at ``path``, a local path or a URI."""
        storage.write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Protocol:
        return cls.from_dict(json.loads(storage.read_text(path)))


def resolve_protocol(corpus: ClipTable, settings: ProtocolSettings) -> Protocol:
    """The protocol of ``corpus`` under ``settings`` (or ``settings.protocol_file``, checked
    against the corpus). Raises ``FoldError``/``ValueError`` naming what is wrong and the fix
    before any heavy work: too few speakers, a fold whose training side lacks a class, a label
    map naming labels the corpus lacks."""
    frame = corpus.frame
    if settings.protocol_file:
        protocol = Protocol.load(settings.protocol_file)
        _check_file_protocol(protocol, frame, settings.protocol_file)
        return protocol
    label_map = _full_label_map(corpus, parse_label_map(settings.label_map, settings.merge_calm))
    kept = frame[frame["emotion"].map(label_map).notna()]
    numbers = speaker_numbers(frame["speaker"])
    scheme = _scheme(settings.folds, corpus.source)
    if scheme == "predefined" and speaker_folds.names_sides(kept):
        sides = _partition_sides(kept, numbers)
    else:
        sides = _fold_sides(scheme, kept, settings, numbers)
    protocol = Protocol(
        classes=_classes(corpus, label_map),
        label_map=label_map,
        speakers={n: s for s, n in numbers.items() if s in set(kept["speaker"])},
        **sides,
    )
    check_protocol(protocol, kept.assign(actor=kept["speaker"].map(numbers)))
    return protocol


def _numbered(numbers: Mapping[str, int], speakers: Iterable[str]) -> tuple[int, ...]:
    return tuple(sorted(numbers[s] for s in speakers))


def _fold_sides(
    scheme: str, kept: pd.DataFrame, settings: ProtocolSettings, numbers: Mapping[str, int]
) -> dict[str, Any]:
    """The :class:`Protocol` fields of folds under ``scheme``: test speakers of each, and
    validation speakers taken from its training (other folds') known speakers."""
    names, test_sets = _test_sets(scheme, kept, settings, numbers)
    genders = speaker_folds.speaker_genders(kept)
    validation = []
    for k in range(len(test_sets)):
        train = [
            s
            for j, other in enumerate(test_sets)
            if j != k
            for s in other
            if not is_unknown_speaker(s)  # a clip of an unknown speaker is no validation speaker
        ]
        val = speaker_folds.validation_speakers(train, genders, numbers, settings.n_val_speakers)
        validation.append(_numbered(numbers, val))
    return {
        "scheme": scheme,
        "folds": tuple(_numbered(numbers, test) for test in test_sets),
        "validation": tuple(validation),
        "fold_names": tuple(names),
    }


def _partition_sides(kept: pd.DataFrame, numbers: Mapping[str, int]) -> dict[str, Any]:
    """The :class:`Protocol` fields of the corpus's own partitions: one fold per test set,
    each trained on the train and dev splits, its validation side the dev split."""
    given = speaker_folds.partitions(kept)
    dev = _numbered(numbers, given.dev)
    training = _numbered(numbers, given.train + given.dev)
    n = len(given.tests)
    return {
        "scheme": PARTITIONS,
        "folds": tuple(_numbered(numbers, test) for test in given.tests),
        "validation": (dev,) * n,
        "fold_names": tuple(given.test_names),
        "training": (training,) * n,
    }


def _classes(corpus: ClipTable, label_map: Mapping[str, str | None]) -> tuple[str, ...]:
    """The classes in index order: in the corpus's own label order where it has one (a merged
    label takes its target's place), else sorted by name."""
    targets = [label_map[label] for label in corpus.labels if label_map[label] is not None]
    return tuple(dict.fromkeys(targets)) if corpus.label_order else tuple(sorted(set(targets)))


def _scheme(folds: str, source: str) -> str:
    if folds == "auto":
        return "contiguous" if source == "ravdess" else "speaker-kfold"
    return folds


def _full_label_map(corpus: ClipTable, given: Mapping[str, str | None]) -> dict[str, str | None]:
    """Every label of the corpus -> its class (itself unless ``given`` maps it)."""
    labels = corpus.labels
    unknown = sorted(set(given) - set(labels) - {"calm"})  # merge_calm's calm may be absent
    if unknown:
        raise SettingsError(
            f"--label-map names labels {unknown} that the corpus does not have; its labels "
            f"are {labels}"
        )
    mapping = {label: given.get(label, label) for label in labels}
    if len({t for t in mapping.values() if t is not None}) < 2:
        raise SettingsError(
            f"the label map leaves fewer than two classes ({mapping}); a classifier needs two"
        )
    return mapping


def _test_sets(
    scheme: str, frame: pd.DataFrame, settings: ProtocolSettings, numbers: Mapping[str, int]
) -> tuple[list[str], list[list[str]]]:
    """(fold names or [], test speakers of each fold by name) under ``scheme``."""
    if scheme in RAVDESS_SCHEMES:
        speakers = sorted({numbers[s] for s in frame["speaker"]})
        ravdess_folds.check_actors(speakers, scheme)
        by_number = {n: s for s, n in numbers.items()}
        sets = ravdess_folds.fold_sets(scheme)
        return [], [[by_number[a] for a in actors] for actors in sets]
    if scheme == "speaker-kfold":
        return [], speaker_folds.speaker_kfold(frame, settings.num_folds, settings.seed)
    if scheme == "session":
        return speaker_folds.session_folds(frame)
    return speaker_folds.predefined_folds(frame)


def check_protocol(protocol: Protocol, clips: pd.DataFrame) -> None:
    """Raise ``FoldError`` unless the protocol fits the clips (``actor`` = speaker number,
    ``emotion``; clips of dropped labels already left out): every speaker in one fold, no
    speaker on two sides, each fold's training side holding every class, every fold with
    test clips."""
    _check_sides(protocol)
    have = set(clips["actor"].astype(int))
    placed = {s for f in (*protocol.folds, *protocol.training) for s in f}
    names = protocol.speakers
    if have - placed:
        raise FoldError(
            f"speakers {sorted(names.get(s, str(s)) for s in have - placed)} have clips but no "
            "fold; resolve the protocol again (without --protocol) or add them to the file"
        )
    classes_of = clips.assign(cls=clips["emotion"].map(protocol.label_map))
    for k in protocol.fold_numbers:
        test, train = protocol.test_and_train(k)
        if not clips["actor"].isin(test).any():
            raise FoldError(f"fold {k} (speakers {[names[s] for s in test]}) has no clips")
        missing = sorted(
            set(protocol.classes) - set(classes_of[classes_of["actor"].isin(train)]["cls"])
        )
        if missing:
            raise FoldError(
                f"fold {k}: its training speakers have no clips of class(es) {missing}; merge "
                "or drop them with --label-map, or choose other folds"
            )


def _check_sides(protocol: Protocol) -> None:
    """No speaker in two folds, and each fold's validation speakers among its training
    speakers; with given sides also no test speaker on a training side."""
    folds = [[str(s) for s in f] for f in protocol.folds]
    validation = [[str(s) for s in v] for v in protocol.validation]
    if not protocol.given_sides:
        speaker_folds.check_disjoint(folds, validation)
        return
    speaker_folds.check_disjoint(folds)
    for k in protocol.fold_numbers:
        test, train = protocol.test_and_train(k)
        ravdess_folds.check_no_leakage(train, test)
        outside = sorted(set(protocol.validation[k - 1]) - set(train))
        if outside:
            raise FoldError(
                f"test set {k}'s validation speakers {speakers_of(protocol, outside)} are not "
                "on its training side"
            )


def _check_file_protocol(protocol: Protocol, frame: pd.DataFrame, path: str) -> None:
    """A protocol read from ``path`` must name exactly the corpus's speakers and labels."""
    names = set(protocol.speakers.values())
    have = set(frame["speaker"])
    kept = frame[frame["emotion"].map(lambda e: protocol.label_map.get(e)).notna()]
    problems = []
    if have - names and set(kept["speaker"]) - names:
        problems.append(f"speakers not in it: {sorted(set(kept['speaker']) - names)[:10]}")
    if names - have:
        problems.append(f"speakers the corpus lacks: {sorted(names - have)[:10]}")
    unknown = sorted(set(frame["emotion"]) - set(protocol.label_map))
    if unknown:
        problems.append(f"labels not in its label map: {unknown}")
    numbers = speaker_numbers(frame["speaker"])
    if protocol.speakers != {n: s for s, n in numbers.items() if s in names}:
        problems.append("speaker numbers differ from this corpus's")
    if problems:
        raise FoldError(
            f"--protocol {path} does not fit this corpus ({'; '.join(problems)}); resolve the "
            "protocol again without --protocol"
        )
    check_protocol(protocol, kept.assign(actor=kept["speaker"].map(numbers)))


def ravdess_protocol(
    scheme: str = "contiguous", merge_calm: bool = False, n_val_speakers: int = 4
) -> Protocol:
    """The RAVDESS protocol without reading a corpus (24 actors, 8 emotions): for jobs and
    tests that start from a prepared features folder of the full corpus."""
    labels = list(ravdess.EMOTIONS.values())
    rows = [
        {"speaker": str(a), "emotion": e, "gender": "male" if a % 2 else "female"}
        for a in range(1, ravdess.NUM_ACTORS + 1)
        for e in labels
    ]
    corpus = ClipTable(
        clip_frame({"path": f"{r['speaker']}/{r['emotion']}", **r} for r in rows),
        [],
        "ravdess",
        tuple(labels),
    )
    settings = ProtocolSettings(folds=scheme, merge_calm=merge_calm, n_val_speakers=n_val_speakers)
    return resolve_protocol(corpus, settings)


def speakers_of(protocol: Protocol, numbers: Sequence[int]) -> list[str]:
    """The names of speaker numbers (for messages and summaries)."""
    return [protocol.speakers.get(int(n), str(n)) for n in numbers]
