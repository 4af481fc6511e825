"""Speaker-disjoint folds of any corpus, and the validation speakers of a fold (pure, no Ray).

Each fold builder reads a clip frame (:attr:`ser_ray.corpus.clips.ClipTable.frame`) and
returns the folds as lists of TEST speakers (speaker names in natural order, so ``"2"``
comes before ``"10"``); every speaker of the frame is in exactly one fold, and a fold trains
on the speakers of all the others.

- :func:`speaker_kfold`: k folds balanced by gender and clip count, from a seed.
- :func:`session_folds`: leave-one-session-out (IEMOCAP style), from the ``session`` column.
- :func:`predefined_folds`: the manifest's own folds, from the ``fold`` (else ``split``) column.
- :func:`partitions`: a ``split`` column that names sides (``train``, ``dev``, test sets under
  any other names, as MSP-Podcast's ``test1``/``test2``): official partitions, no k-fold.

:func:`validation_speakers` picks a fold's validation speakers from its training speakers
(the rule the study has always used for RAVDESS, odd actors male) and
:func:`check_disjoint` checks that no speaker is on two sides. Every error is a
:class:`~ser_ray.corpus.folds.FoldError` naming the numbers and the fix.

>>> natural_key("Session10") > natural_key("Session2")
True
>>> validation_speakers(["1", "2", "3", "4"], {"1": "male", "2": "female"}, {"1": 1, "2": 2,
...     "3": 3, "4": 4}, 3)
['1', '2', '4']
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter, defaultdict
from itertools import chain, zip_longest
from typing import Any

import numpy as np
import pandas as pd

from ser_ray.corpus.clips import GENDERS
from ser_ray.corpus.folds import FoldError

Folds = list[list[str]]

#: Gender groups :func:`speaker_kfold` balances, in the order it fills them.
GENDER_GROUPS: tuple[str | None, ...] = (*GENDERS, None)
#: ``split`` values (any case) that name the training side of given partitions.
TRAIN_SPLITS = frozenset({"train", "training"})
#: ``split`` values (any case) that name the validation (dev) side of given partitions.
DEV_SPLITS = frozenset({"dev", "val", "valid", "validation"})
#: ``split`` values that name a training or validation side, not a group to test on.
NOT_TEST_SPLITS = TRAIN_SPLITS | DEV_SPLITS
#: How many offending speakers or clips an error message lists.
SHOWN = 5


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders the digit runs of ``name`` by value (``"s2"`` before ``"s10"``);
    the name itself breaks ties, so that the order is total."""
    parts = re.split(r"([0-9]+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def speaker_genders(frame: pd.DataFrame) -> dict[str, str | None]:
    """Speaker -> ``male``, ``female`` or None: the one gender the speaker's clips give;
    None when they give none, or disagree."""
    known = defaultdict(set)
    for speaker, gender in zip(frame["speaker"].astype(str), frame["gender"], strict=True):
        known[speaker].update({gender} & set(GENDERS))
    return {speaker: _only(genders) for speaker, genders in known.items()}


# --- k speaker-disjoint folds ------------------------------------------------------------


def speaker_kfold(frame: pd.DataFrame, k: int, seed: int = 0) -> Folds:
    """``k`` speaker-disjoint folds (test speakers of each), balanced by gender and clips.

    The speakers are shuffled with ``seed``; then, one gender group at a time (male, female,
    unknown), from the speaker with the most clips down (ties in shuffled order), each goes
    to the fold with the fewest speakers of that gender, then the fewest clips, then the
    lowest index. So fold sizes differ by at most one speaker per gender group, clip counts
    stay close, and no fold is empty. The same frame (in any row order), ``k`` and ``seed``
    give the same folds.
    """
    speakers = _speakers(frame)
    _check_k(len(speakers), k)
    clips = Counter(frame["speaker"].astype(str))
    genders = speaker_genders(frame)
    shuffled = [speakers[i] for i in np.random.default_rng(seed).permutation(len(speakers))]
    folds: Folds = [[] for _ in range(k)]
    fold_clips = [0] * k
    for gender in GENDER_GROUPS:
        taken = [0] * k  # speakers of this gender in each fold
        group = [s for s in shuffled if genders[s] == gender]
        for speaker in sorted(group, key=lambda s: -clips[s]):  # stable: ties stay shuffled
            fold = min(range(k), key=lambda f: (taken[f], fold_clips[f], f))
            folds[fold].append(speaker)
            taken[fold] += 1
            fold_clips[fold] += clips[speaker]
    return [sorted(fold, key=natural_key) for fold in folds]


def _check_k(num_speakers: int, k: int) -> None:
    if k < 2:
        raise FoldError(
            f"speaker k-fold needs at least 2 folds, not {k}; set --num-folds to 2 or more"
        )
    if num_speakers < k:
        raise FoldError(
            f"{num_speakers} speakers cannot form {k} speaker-disjoint folds; "
            f"lower --num-folds to at most {num_speakers}"
        )


# --- folds the corpus names: sessions, the manifest's folds ------------------------------


def session_folds(frame: pd.DataFrame) -> tuple[list[str], Folds]:
    """Leave-one-session-out: (session names in natural order, the speakers of each).

    Every clip needs a ``session`` and every speaker must be in one session only.
    """
    fix = "or use speaker k-fold folds (--num-folds) instead"
    sessions = frame["session"].map(_text)
    _check_labelled(frame, sessions, "session", f"give every clip a session, {fix}")
    names, folds = _group_speakers(frame, sessions, "session", fix)
    _check_at_least_two(names, "session", fix)
    return names, folds


def predefined_folds(frame: pd.DataFrame) -> tuple[list[str], Folds]:
    """The manifest's own folds: (fold names in natural order, the speakers of each).

    Read from the ``fold`` column, or, when no clip has a fold, from the ``split`` column,
    each distinct value being one fold of test speakers (a split column that names sides,
    :func:`names_sides`, is read by :func:`partitions` instead). Every clip needs a value and
    every speaker must be in one fold only.
    """
    fix = "or use speaker k-fold folds (--num-folds) instead"
    column = _fold_column(frame, fix)
    values = frame[column].map(_text)
    _check_labelled(frame, values, column, f"give every clip a {column}, {fix}")
    names, folds = _group_speakers(frame, values, column, fix)
    _check_at_least_two(names, column, fix)
    return names, folds


def _fold_column(frame: pd.DataFrame, fix: str) -> str:
    for column in ("fold", "split"):
        if frame[column].map(_text).notna().any():
            return column
    raise FoldError(f"no clip has a fold or a split; give the manifest a fold column, {fix}")


# --- official partitions: train, dev and test sets given ----------------------------------


@dataclasses.dataclass(frozen=True)
class Partitions:
    """A corpus's own partitions: the speakers of its training side, of its dev side (the
    validation side: epochs and settings are chosen on it), and of each test set by name."""

    train: list[str]
    dev: list[str]
    test_names: list[str]
    tests: Folds


def names_sides(frame: pd.DataFrame) -> bool:
    """Whether the manifest's partitions are sides (``train``, ``dev``, test sets), not folds:
    no clip has a ``fold`` and some ``split`` names a training or validation side."""
    if frame["fold"].map(_text).notna().any():
        return False
    splits = frame["split"].map(_text).dropna()
    return any(s.lower() in NOT_TEST_SPLITS for s in splits)


def partitions(frame: pd.DataFrame) -> Partitions:
    """The sides the ``split`` column names: ``train``/``training``, ``dev``/``val``/``valid``/
    ``validation`` (any case), and every other value a test set of its own (natural order).

    Every clip needs a split; a known speaker in two splits is refused (one line naming the
    speaker and the splits); an unknown-speaker clip is its own pseudo-speaker
    (:func:`ser_ray.corpus.clips.mark_unknown_speakers`), so it never is.
    """
    fix = "or give the manifest a fold column for k-fold folds"
    values = frame["split"].map(_text)
    _check_labelled(frame, values, "split", f"give every clip a split, {fix}")
    names, groups = _group_speakers(frame, values, "split", fix)
    train = [s for n, g in zip(names, groups, strict=True) if n.lower() in TRAIN_SPLITS for s in g]
    dev = [s for n, g in zip(names, groups, strict=True) if n.lower() in DEV_SPLITS for s in g]
    tests = [(n, g) for n, g in zip(names, groups, strict=True) if n.lower() not in NOT_TEST_SPLITS]
    given = ", ".join(names)
    for side, speakers, words in (("train", train, TRAIN_SPLITS), ("dev", dev, DEV_SPLITS)):
        if not speakers:
            raise FoldError(
                f"the split column ({given}) has no {side} side; name it "
                f"{' or '.join(sorted(words))}, {fix}"
            )
    if not tests:
        raise FoldError(
            f"the split column ({given}) has no test set: give test clips a split of their own "
            f"(e.g. test1, test2), {fix}"
        )
    return Partitions(
        sorted(train, key=natural_key),
        sorted(dev, key=natural_key),
        [n for n, _ in tests],
        [g for _, g in tests],
    )


def _check_labelled(frame: pd.DataFrame, values: pd.Series, what: str, fix: str) -> None:
    missing = frame["path"][values.isna()].astype(str).tolist()
    if missing:
        raise FoldError(
            f"{len(missing)} of {len(frame)} clips have no {what} "
            f"(first: {', '.join(missing[:SHOWN])}); {fix}"
        )


def _group_speakers(
    frame: pd.DataFrame, values: pd.Series, what: str, fix: str
) -> tuple[list[str], Folds]:
    """(the distinct values in natural order, the speakers of each); every speaker must
    have one value."""
    found = defaultdict(set)
    for speaker, value in zip(frame["speaker"].astype(str), values, strict=True):
        found[speaker].add(value)
    split = {s: sorted(v, key=natural_key) for s, v in found.items() if len(v) > 1}
    if split:
        shown = [f"{s} ({', '.join(split[s])})" for s in sorted(split, key=natural_key)]
        raise FoldError(
            f"{len(split)} speakers are in more than one {what}: {'; '.join(shown[:SHOWN])}; "
            f"speaker-disjoint folds need each speaker in one {what}: fix the {what} "
            f"column, {fix}"
        )
    names = sorted({_only(v) for v in found.values()}, key=natural_key)
    folds = [
        sorted((s for s, v in found.items() if v == {name}), key=natural_key) for name in names
    ]
    return names, folds


def _check_at_least_two(names: list[str], what: str, fix: str) -> None:
    if len(names) < 2:
        raise FoldError(
            f"{len(names)} distinct {what} value ({', '.join(names)}) cannot form "
            f"speaker-disjoint folds: at least 2 are needed, {fix}"
        )


# --- validation speakers and checks ------------------------------------------------------


def validation_speakers(
    train: list[str], genders: dict[str, str | None], order: dict[str, int], n_val: int
) -> list[str]:
    """``n_val`` validation speakers taken from the training speakers ``train`` only.

    Walks ``train`` from the highest ``order`` (speaker number) down, alternating male then
    female (one group going on alone once the other runs dry); speakers of unknown gender
    (missing from ``genders``, or None) come after both. With RAVDESS's genders this is
    RAVDESS's validation actors; with no gender known, the last ``n_val``.
    Returned in ``order``.
    """
    if not 0 <= n_val < len(train):
        raise FoldError(
            f"cannot hold out {n_val} validation speakers from {len(train)} training "
            f"speakers; use 0 to {len(train) - 1} validation speakers"
        )
    walk = sorted(train, key=order.__getitem__, reverse=True)
    males = [s for s in walk if genders.get(s) == "male"]
    females = [s for s in walk if genders.get(s) == "female"]
    unknown = [s for s in walk if genders.get(s) not in GENDERS]
    alternating = [s for s in chain(*zip_longest(males, females)) if s is not None]
    return sorted((alternating + unknown)[:n_val], key=order.__getitem__)


def check_disjoint(folds: Folds, validation: Folds | None = None) -> None:
    """Raise :class:`FoldError` if a speaker is in two folds, or if a fold's validation
    speakers (``validation[k]`` for ``folds[k]``) are its test speakers or not among its
    training speakers (the speakers of the other folds)."""
    where = defaultdict(list)
    for k, fold in enumerate(folds, 1):
        for speaker in fold:
            where[speaker].append(k)
    repeated = [f"{s} (folds {_numbers(ks)})" for s, ks in where.items() if len(ks) > 1]
    if repeated:
        raise FoldError(f"speakers in more than one fold: {'; '.join(repeated[:SHOWN])}")
    if validation is None:
        return
    if len(validation) != len(folds):
        raise FoldError(f"{len(validation)} validation sets for {len(folds)} folds")
    for k, (test, val) in enumerate(zip(folds, validation, strict=True), 1):
        _check_validation(k, set(test), set(where) - set(test), val)


def _check_validation(k: int, test: set[str], train: set[str], val: list[str]) -> None:
    in_test = sorted(set(val) & test, key=natural_key)
    if in_test:
        raise FoldError(f"fold {k}'s validation speakers {in_test} are its test speakers")
    outside = sorted(set(val) - train, key=natural_key)
    if outside:
        raise FoldError(
            f"fold {k}'s validation speakers {outside} are not among its training speakers"
        )


# --- small helpers -----------------------------------------------------------------------


def _speakers(frame: pd.DataFrame) -> list[str]:
    return sorted(set(frame["speaker"].astype(str)), key=natural_key)


def _text(value: Any) -> str | None:
    """A fold, split or session value as text; None for a missing or blank one (a whole
    float, as pandas reads an integer column with gaps, loses its ``.0``)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip() or None


def _only(values: set[Any]) -> Any:
    """The one element of ``values``; None when there is none or more than one."""
    return next(iter(values)) if len(values) == 1 else None


def _numbers(ks: list[int]) -> str:
    return ", ".join(str(k) for k in ks)
