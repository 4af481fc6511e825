"""Speaker normalisation: per-actor statistics from that actor's own clips, never labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ser_ray.features.speaker_norm import SpeakerNormError, speaker_normalize
from ser_ray.models import svm


def _table(seed: int = 0) -> pd.DataFrame:
    """3 actors x 5 clips of 6 features, each actor with its own offset and scale."""
    rng = np.random.default_rng(seed)
    rows = []
    for actor in (1, 2, 3):
        for clip in range(5):
            values = actor * 10 + actor * rng.normal(size=6)
            rows.append(
                {
                    "path": f"Actor_{actor:02d}/clip{clip}.wav",
                    "actor": actor,
                    "emotion": ["neutral", "angry"][clip % 2],
                    "mfcc_stats": values[:4].astype(np.float32),
                    "egemaps": values[4:].astype(np.float32),
                }
            )
    return pd.DataFrame(rows)


def test_each_actor_is_centred_and_scaled_on_its_own_clips():
    df = _table()
    X = svm.feature_set_matrix(df, "mfcc+egemaps", speaker_normalise=True)
    assert X.shape == (15, 6)
    for actor in (1, 2, 3):
        block = X[df["actor"] == actor]
        np.testing.assert_allclose(block.mean(axis=0), 0, atol=1e-9)
        np.testing.assert_allclose(block.std(axis=0), 1, atol=1e-6)
    raw = svm.feature_set_matrix(df, "mfcc+egemaps")
    rows = (df["actor"] == 2).to_numpy()
    expected = (raw[rows] - raw[rows].mean(axis=0)) / raw[rows].std(axis=0)
    np.testing.assert_allclose(X[rows], expected)


def test_an_actor_is_unchanged_when_another_actors_audio_changes():
    df = _table()
    before = svm.feature_set_matrix(df, "mfcc", speaker_normalise=True)
    other = (df["actor"] == 3).to_numpy()
    changed = df.assign(  # actor 3's features change non-linearly (z-scores change too)
        mfcc_stats=[v**3 if o else v for v, o in zip(df["mfcc_stats"], other, strict=True)]
    )
    after = svm.feature_set_matrix(changed, "mfcc", speaker_normalise=True)
    for actor in (1, 2):
        rows = (df["actor"] == actor).to_numpy()
        np.testing.assert_array_equal(after[rows], before[rows])
    assert not np.allclose(after[other], before[other])


def test_no_label_is_read():
    df = _table()
    expected = svm.feature_set_matrix(df, "mfcc", speaker_normalise=True)
    shuffled = df.assign(emotion=df["emotion"].sample(frac=1, random_state=1).to_numpy())
    np.testing.assert_array_equal(svm.feature_set_matrix(shuffled, "mfcc", True), expected)
    np.testing.assert_array_equal(
        svm.feature_set_matrix(df.drop(columns="emotion"), "mfcc", True), expected
    )


def test_a_constant_feature_becomes_zero():
    X = np.array([[1.0, 5.0], [3.0, 5.0]])
    np.testing.assert_array_equal(speaker_normalize(X, [7, 7]), [[-1.0, 0.0], [1.0, 0.0]])


def test_single_clips_and_missing_speakers_are_refused():
    X = np.ones((3, 2))
    with pytest.raises(SpeakerNormError, match=r"speaker 'b' has a single clip \(c\.wav\)"):
        speaker_normalize(X, ["a", "a", "b"], names=["a.wav", "b.wav", "c.wav"])
    with pytest.raises(SpeakerNormError, match=r"1 clip\(s\) have no speaker.*b\.wav"):
        speaker_normalize(X, ["a", None, "a"], names=["a.wav", "b.wav", "c.wav"])
    with pytest.raises(SpeakerNormError, match="3 clips but 2 speaker labels"):
        speaker_normalize(X, ["a", "a"])
