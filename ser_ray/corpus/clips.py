"""A corpus is a table of clips: where each clip is, who speaks, which emotion (pure, no Ray).

Every source (a RAVDESS folder, a clip manifest, a CREMA-D-named folder, an EmoBox jsonl)
becomes one :class:`ClipTable`; everything downstream (the protocol, the features, the
studies) reads that table and nothing source-specific. Speakers keep the corpus's own names
(``speaker``, a string); the features and the folds refer to them by a number
(:func:`speaker_numbers`: the name itself when every name is an integer, as RAVDESS's actors
1-24 or CREMA-D's 1001-1091, else the position in sorted order).

>>> speaker_numbers(["12", "3", "12"])
{'3': 3, '12': 12}
>>> speaker_numbers(["spk_b", "spk_a"])
{'spk_a': 1, 'spk_b': 2}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import pandas as pd

from ser_ray.common.errors import UserError

#: Columns of :attr:`ClipTable.frame`: the required three, then the optional ones (None where
#: a source does not know them), then the file's size and time (-1 when unknown) that tell a
#: prepared folder whether its input changed. A manifest's other columns follow, as text.
REQUIRED_COLUMNS = ("path", "speaker", "emotion")
OPTIONAL_COLUMNS = ("gender", "session", "fold", "split", "corpus")
FILE_COLUMNS = ("size_bytes", "mtime_ns")
CLIP_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS + FILE_COLUMNS
GENDERS = ("male", "female")


class CorpusError(UserError, ValueError):
    """A corpus (folder or manifest) that cannot be read as clips; the message names the
    rows or files and the fix."""


@dataclasses.dataclass
class ClipTable:
    """One row per clip of a corpus, and the files the source left out (with why).

    ``frame`` holds :data:`CLIP_COLUMNS`: ``path`` (absolute path or URI), ``speaker`` (str),
    ``emotion`` (the corpus's own label, before any label map), ``gender`` (``male``,
    ``female`` or None), ``session``, ``fold``, ``split``, ``corpus`` (str or None),
    ``size_bytes`` and ``mtime_ns`` (-1 when unknown), then any extra manifest columns.
    ``label_order`` is the corpus's own class order (RAVDESS's emotion codes); None means
    sorted by name.
    """

    frame: pd.DataFrame
    skipped: list[tuple[str, str]]  # (path or row, reason)
    kind: str  # "ravdess", "manifest", "cremad", "emobox", ...
    label_order: tuple[str, ...] | None = None

    @property
    def labels(self) -> list[str]:
        """The corpus's labels, in :attr:`label_order` (labels it does not list at the end,
        sorted), else sorted."""
        present = set(self.frame["emotion"])
        order = [label for label in self.label_order or () if label in present]
        return order + sorted(present - set(order))


def clip_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """The rows (dicts with at least :data:`REQUIRED_COLUMNS`) as a clip frame with every
    column of :data:`CLIP_COLUMNS` (missing optional ones None, file ones -1), extra keys
    after them."""
    frame = pd.DataFrame(list(rows))
    for name in REQUIRED_COLUMNS:
        if name not in frame.columns:
            frame[name] = pd.Series(dtype=object)
    for name in OPTIONAL_COLUMNS:
        if name not in frame.columns:
            frame[name] = None
    for name in FILE_COLUMNS:
        frame[name] = frame[name].fillna(-1).astype("int64") if name in frame.columns else -1
    frame["speaker"] = frame["speaker"].astype(str)
    extra = [c for c in frame.columns if c not in CLIP_COLUMNS]
    return frame[list(CLIP_COLUMNS) + extra].reset_index(drop=True)


def speaker_numbers(speakers: Iterable[str]) -> dict[str, int]:
    """Speaker name -> number (the features' ``actor`` column): the name's integer value when
    every name is a plain integer (RAVDESS actors 1-24, CREMA-D 1001-1091), else 1.. in sorted
    name order. Deterministic for a given set of names."""
    names = sorted(set(speakers))
    if names and all(name.isdigit() for name in names):
        numbers = {name: int(name) for name in names}
        if len(set(numbers.values())) == len(numbers):  # "01" and "1" would collide
            return dict(sorted(numbers.items(), key=lambda kv: kv[1]))
    return {name: k for k, name in enumerate(names, 1)}
