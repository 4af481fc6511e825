"""RAVDESS's actor-disjoint fold sets and the checks every protocol uses (pure, no Ray).

Six folds of four actors. ``contiguous`` takes blocks 1–4, 5–8, … (two male, two female
each); ``emobox`` uses the fold sets of the EmoBox benchmark, to compare with its tables.
:mod:`ser_ray.corpus.protocol` turns them (or any corpus's speaker folds) into a protocol.

>>> fold_sets("emobox")[0]
[1, 11, 20, 21]
"""

from __future__ import annotations

from collections.abc import Iterable

from ser_ray.common.errors import UserError

FOLD_SCHEMES: dict[str, list[list[int]]] = {
    "contiguous": [list(range(start, start + 4)) for start in range(1, 25, 4)],
    "emobox": [
        [1, 11, 20, 21],
        [4, 10, 12, 14],
        [8, 9, 19, 23],
        [3, 5, 7, 24],
        [2, 15, 16, 18],
        [6, 13, 17, 22],
    ],
}


class FoldError(UserError, ValueError):
    """Speakers that cannot form the folds, or folds that leak a speaker."""


def fold_sets(folds: str = "contiguous") -> list[list[int]]:
    """The actors of each fold (fold k is ``fold_sets()[k - 1]``)."""
    if folds not in FOLD_SCHEMES:
        raise FoldError(f"unknown fold scheme {folds!r}; choose one of {sorted(FOLD_SCHEMES)}")
    return [list(actors) for actors in FOLD_SCHEMES[folds]]


def check_actors(actors: Iterable[int], folds: str = "contiguous") -> None:
    """Raise :class:`FoldError` unless ``actors`` are exactly the actors the folds need."""
    have = set(actors)
    need = {actor for actors in fold_sets(folds) for actor in actors}
    missing, extra = sorted(need - have), sorted(have - need)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"actors missing: {missing}")
        if extra:
            parts.append(f"actors not in any fold: {extra}")
        raise FoldError(
            f"the corpus cannot form the {folds} folds ({'; '.join(parts)}); "
            f"six folds of four actors need actors 1–24 each with clips"
        )


def check_no_leakage(train_speakers: Iterable[int], test_speakers: Iterable[int]) -> None:
    """Raise :class:`FoldError` if a speaker is on both sides of a split."""
    shared = sorted(set(train_speakers) & set(test_speakers))
    if shared:
        raise FoldError(f"speakers {shared} are in both the training and the test side")
