"""Speaker normalisation: z-normalise each clip's features over its own speaker's clips (no Ray).

Every feature of a clip is centred and scaled by the mean and standard deviation of that
feature over the clips of the same speaker (in RAVDESS, the same actor). The statistics come
from audio features only, never from labels, and a speaker's statistics only from that
speaker's clips, so a test actor is normalised with test-actor clips alone. It is
*transductive* for test speakers (it uses their unlabelled clips), as in Pepino et al. 2021.
A speaker with a single clip has no spread to scale by: that is refused, not guessed.

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

from ser_ray.common.errors import UserError

#: How a run says which normalisation ran (summary.md, summary.json, config.json).
DESCRIPTION = (
    "per-speaker z-normalisation of the features (mean/std over each actor's own clips, "
    "unlabelled; transductive for test actors)"
)
NONE = "none"


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
