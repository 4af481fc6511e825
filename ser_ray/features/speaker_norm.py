"""Speaker normalisation: z-normalise each clip's features over its own speaker's clips (no Ray).

Every feature of a clip is centred and scaled by the mean and standard deviation of that
feature over the clips of the same speaker (in RAVDESS, the same actor). The statistics come
from audio features only, never from labels, and a speaker's statistics only from that
speaker's clips, so a test speaker is normalised with test-speaker clips alone. It is
*transductive* for test speakers (it uses their unlabelled clips), as in Pepino et al. 2021.
A speaker with a single clip has no spread to scale by: that is refused, not guessed.

A clip of an unknown speaker (:func:`ser_ray.corpus.clips.is_unknown_speaker`) has no
speaker's clips to be normalised over. It is pooled with the other unknown-speaker clips of
its side: the clips of unknown speakers with the same split, fold and session values are one
normalisation group (:func:`normalisation_groups`), still never a speaker anywhere else. So
the statistics never cross a side (a test set's unknown clips are normalised with that test
set's unknown clips only), and, as for known speakers, they come from audio, not labels. A
clip of an unknown speaker with no split, fold or session, or alone on its side, is refused.

>>> import numpy as np
>>> X = np.array([[1.0, 10.0], [3.0, 10.0], [100.0, 0.0], [300.0, 2.0]])
>>> speaker_normalize(X, ["a", "a", "b", "b"])
array([[-1.,  0.],
       [ 1.,  0.],
       [-1., -1.],
       [ 1.,  1.]])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ser_ray.common.errors import UserError
from ser_ray.corpus.clips import is_unknown_speaker

#: How a run says which normalisation ran (summary.md, summary.json, config.json).
DESCRIPTION = (
    "per-speaker z-normalisation of the features (mean/std over each speaker's own clips, "
    "unlabelled; transductive for test speakers)"
)
NONE = "none"
#: The columns whose values make a side: unknown-speaker clips are pooled within one.
SIDE_COLUMNS = ("split", "fold", "session")


class SpeakerNormError(UserError, ValueError):
    """Clips that cannot be speaker-normalised (no speaker, or a speaker with one clip)."""


def speaker_normalize(
    X: np.ndarray,  # noqa: N803 - the usual name of a feature matrix
    speakers: Sequence[object],
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """``X`` (clips x features) with every row z-normalised over the rows of its speaker.

    A feature that is constant within a speaker becomes 0 for that speaker. ``names`` (e.g.
    the clips' paths) only make error messages precise. Raises :class:`SpeakerNormError`
    when a clip has no speaker (None or NaN) or a speaker has a single clip.
    """
    X = np.asarray(X, dtype=np.float64)
    speakers = list(speakers)
    if len(speakers) != len(X):
        raise SpeakerNormError(f"{len(X)} clips but {len(speakers)} speaker labels")
    names = list(names) if names is not None else [f"row {i}" for i in range(len(X))]
    no_speaker = [n for n, s in zip(names, speakers, strict=True) if _missing(s)]
    if no_speaker:
        raise SpeakerNormError(
            f"{len(no_speaker)} clip(s) have no speaker, e.g. {no_speaker[:5]}; speaker "
            "normalisation needs each clip's speaker (give one, or leave speaker norm off)"
        )
    out = np.empty_like(X)
    groups: dict[object, list[int]] = {}
    for i, s in enumerate(speakers):
        groups.setdefault(s, []).append(i)
    for speaker, rows in groups.items():
        if len(rows) < 2:
            raise SpeakerNormError(
                f"speaker {speaker!r} has a single clip ({names[rows[0]]}); its statistics "
                "cannot be estimated from one clip: give more clips of that speaker, or leave "
                "speaker normalisation off"
            )
        block = X[rows]
        std = block.std(axis=0)
        out[rows] = (block - block.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return out


def _missing(speaker: object) -> bool:
    return speaker is None or (isinstance(speaker, float) and np.isnan(speaker)) or speaker == ""


def normalisation_groups(frame: pd.DataFrame) -> list[object]:
    """The group each row of ``frame`` is normalised over (for :func:`speaker_normalize`):
    its ``actor`` when its ``speaker`` is known (or the frame has no ``speaker``); for a
    clip of an unknown speaker, ``"unknown speakers of split test1"`` (its
    :data:`SIDE_COLUMNS` values): the unknown-speaker clips of one side pooled. Raises
    :class:`SpeakerNormError` for an unknown-speaker clip with no side.

    >>> frame = pd.DataFrame({"path": ["1.wav", "2.wav", "3.wav", "4.wav"], "actor": [1, 1, 5, 6],
    ...     "speaker": ["a", "a", "?unknown-3", "?unknown-4"],
    ...     "split": ["train", "train", "test1", "test1"]})
    >>> normalisation_groups(frame)
    [1, 1, 'unknown speakers of split test1', 'unknown speakers of split test1']
    """
    if "speaker" not in frame.columns:
        return frame["actor"].tolist()
    columns = [c for c in SIDE_COLUMNS if c in frame.columns]
    groups: list[object] = []
    for row in frame[["actor", "speaker", "path", *columns]].itertuples(index=False):
        if not is_unknown_speaker(row.speaker):
            groups.append(row.actor)
            continue
        sides = [f"{c} {getattr(row, c)}" for c in columns if not _missing(getattr(row, c))]
        if not sides:
            raise SpeakerNormError(
                f"clip {row.path} has an unknown speaker and no split, fold or session: "
                "speaker normalisation pools unknown-speaker clips by their side; give it "
                "one, or run without +spknorm variants"
            )
        groups.append("unknown speakers of " + ", ".join(sides))
    return groups
