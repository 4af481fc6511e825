"""Actor-disjoint folds for speaker-independent evaluation (pure, no Ray).

Six folds of four actors. ``contiguous`` takes blocks 1–4, 5–8, … (two male, two female
each); ``emobox`` uses the fold sets of the EmoBox benchmark, to compare with its tables.

>>> fold_of_actor("contiguous")[7]
2
>>> test_and_train_actors(1, "emobox")[0]
[1, 11, 20, 21]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

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
FOLDS_HELP = (
    "fold scheme: contiguous (actors 1-4, 5-8, ...: two male, two female each) or emobox "
    "(EmoBox's fold sets, to compare with its tables)"
)


def folds_field(default: str = "contiguous") -> Any:
    """The ``folds`` field (the fold scheme) of a settings dataclass, with its help and
    choices: declared once for every config and job that takes ``--folds``."""
    return dataclasses.field(
        default=default, metadata={"help": FOLDS_HELP, "choices": sorted(FOLD_SCHEMES)}
    )


class FoldError(ValueError):
    """Actors that cannot form the folds, or folds that leak an actor."""


def fold_sets(folds: str = "contiguous") -> list[list[int]]:
    """The actors of each fold (fold k is ``fold_sets()[k - 1]``)."""
    if folds not in FOLD_SCHEMES:
        raise FoldError(f"unknown fold scheme {folds!r}; choose one of {sorted(FOLD_SCHEMES)}")
    return [list(actors) for actors in FOLD_SCHEMES[folds]]


def fold_of_actor(folds: str = "contiguous") -> dict[int, int]:
    """Actor -> fold number (1-based)."""
    return {actor: k for k, actors in enumerate(fold_sets(folds), 1) for actor in actors}


def test_and_train_actors(fold: int, folds: str = "contiguous") -> tuple[list[int], list[int]]:
    """(test actors, training actors) of one outer fold."""
    sets = fold_sets(folds)
    if not 1 <= fold <= len(sets):
        raise FoldError(f"fold {fold} does not exist; folds are 1..{len(sets)}")
    test = sets[fold - 1]
    train = sorted(a for k, actors in enumerate(sets, 1) if k != fold for a in actors)
    return test, train


def check_actors(actors: Iterable[int], folds: str = "contiguous") -> None:
    """Raise :class:`FoldError` unless ``actors`` are exactly the actors the folds need."""
    have = set(actors)
    need = set(fold_of_actor(folds))
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


def check_no_leakage(train_actors: Iterable[int], test_actors: Iterable[int]) -> None:
    """Raise :class:`FoldError` if an actor is on both sides of a split."""
    shared = sorted(set(train_actors) & set(test_actors))
    if shared:
        raise FoldError(f"actors {shared} are in both the training and the test side")


def validation_actors(train_actors: Iterable[int], n_val: int = 4) -> list[int]:
    """Validation actors drawn from the training side: the last ``n_val`` with gender balance.

    Deterministic: takes actors from the end of the sorted list, alternating male (odd) and
    female (even), so that model selection never looks at the test fold.
    """
    train = sorted(train_actors)
    if n_val >= len(train):
        raise FoldError(f"cannot hold out {n_val} validation actors from {len(train)} actors")
    males = [a for a in reversed(train) if a % 2]
    females = [a for a in reversed(train) if not a % 2]
    picked: list[int] = []
    while len(picked) < n_val and (males or females):
        for group in (males, females):
            if group and len(picked) < n_val:
                picked.append(group.pop(0))
    return sorted(picked)


def fold_split(
    fold: int, folds: str = "contiguous", n_val_actors: int = 4
) -> tuple[list[int], list[int], list[int]]:
    """(test actors, training actors without validation, validation actors) of one fold."""
    test_actors, train_actors = test_and_train_actors(fold, folds)
    val_actors = validation_actors(train_actors, n_val_actors) if n_val_actors else []
    fit_actors = [a for a in train_actors if a not in val_actors]
    check_no_leakage(fit_actors + val_actors, test_actors)
    return test_actors, fit_actors, val_actors
