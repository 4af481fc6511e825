"""A corpus is a table of clips: where each clip is, who speaks, which emotion (pure, no Ray).

Every source (a RAVDESS folder, a clip manifest, a CREMA-D-named folder, an EmoBox jsonl)
becomes one :class:`ClipTable`; everything downstream (the protocol, the features, the
studies) reads that table and nothing source-specific. Speakers keep the corpus's own names
(``speaker``, a string); the features and the folds refer to them by a number
(:func:`speaker_numbers`: the name itself when every name is an integer, as RAVDESS's actors
1-24 or CREMA-D's 1001-1091, else the position in sorted order).

A clip whose speaker is not known (an empty cell, or ``Unknown``: large corpora such as
MSP-Podcast have many) is never one speaker with the other unknown clips: it becomes its own
pseudo-speaker (:func:`mark_unknown_speakers`, named ``?unknown-<row>``), so folds, splits,
speaker-disjointness checks and speaker-grouped cross-validation treat it as a speaker of one
clip, and speaker normalisation pools it with the unknown clips of its side
(:func:`ser_ray.features.speaker_norm.normalisation_groups`).

>>> speaker_numbers(["12", "3", "12"])
{'3': 3, '12': 12}
>>> speaker_numbers(["spk_b", "spk_a"])
{'spk_a': 1, 'spk_b': 2}
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import pandas as pd

from ser_ray.common.errors import UserError

log = logging.getLogger(__name__)

#: Columns of :attr:`ClipTable.frame`: the required three, then the optional ones (None where
#: a source does not know them), then the file's size and time (-1 when unknown) that tell a
#: prepared folder whether its input changed. A manifest's other columns follow, as text.
REQUIRED_COLUMNS = ("path", "speaker", "emotion")
OPTIONAL_COLUMNS = ("gender", "session", "fold", "split", "corpus")
FILE_COLUMNS = ("size_bytes", "mtime_ns")
CLIP_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS + FILE_COLUMNS
GENDERS = ("male", "female")
#: The speaker value that means "not known" by default (any case; an empty speaker too).
UNKNOWN_SPEAKER = "unknown"
#: How a pseudo-speaker's name starts (``?`` keeps it apart from any corpus's own names).
UNKNOWN_PREFIX = "?unknown-"


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
    source: str  # the kind of source read: "ravdess", "manifest", "cremad", "emobox", ...
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
    every known name is a plain integer (RAVDESS actors 1-24, CREMA-D 1001-1091), else 1.. in
    sorted name order; unknown-speaker clips' pseudo-speakers (:func:`is_unknown_speaker`)
    after the largest, in name order, so that known speakers keep their numbers.
    Deterministic for a given set of names.

    >>> speaker_numbers(["7", "?unknown-2", "3"])
    {'3': 3, '7': 7, '?unknown-2': 8}
    """
    everyone = sorted(set(speakers))
    names = [name for name in everyone if not is_unknown_speaker(name)]
    numbers = {name: k for k, name in enumerate(names, 1)}
    if names and all(name.isdigit() for name in names):
        as_ints = {name: int(name) for name in names}
        if len(set(as_ints.values())) == len(as_ints):  # "01" and "1" would collide
            numbers = dict(sorted(as_ints.items(), key=lambda kv: kv[1]))
    first = max(numbers.values(), default=0) + 1
    unknown = [name for name in everyone if is_unknown_speaker(name)]
    return {**numbers, **{name: k for k, name in enumerate(unknown, first)}}


def is_unknown_speaker(name: str) -> bool:
    """Whether a speaker name is an unknown-speaker clip's pseudo-speaker."""
    return str(name).startswith(UNKNOWN_PREFIX)


def is_unknown_value(value: str, unknown: str = UNKNOWN_SPEAKER) -> bool:
    """Whether a corpus's speaker value means "not known": empty, or ``unknown`` in any
    case."""
    text = str(value).strip()
    return not text or text.lower() == unknown.strip().lower()


def mark_unknown_speakers(table: ClipTable, unknown: str = UNKNOWN_SPEAKER) -> ClipTable:
    """``table`` with every clip whose speaker is empty or ``unknown`` (any case) given its
    own pseudo-speaker, ``?unknown-<row>`` (row in table order, zero-padded): never one
    speaker together, so no fold, split or check counts them as one. Logs how many."""
    frame = table.frame
    mask = frame["speaker"].map(lambda s: is_unknown_value(s, unknown))
    if not mask.any():
        return table
    width = len(str(len(frame)))
    frame = frame.copy()
    rows = frame.index[mask]
    frame.loc[mask, "speaker"] = [f"{UNKNOWN_PREFIX}{i + 1:0{width}d}" for i in rows]
    log.info(
        "%d of %d clips have an unknown speaker (empty or %r): each is its own speaker",
        int(mask.sum()),
        len(frame),
        unknown,
    )
    return dataclasses.replace(table, frame=frame)
