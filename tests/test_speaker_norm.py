"""Speaker normalisation: per-speaker statistics from that speaker's own clips, never labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ser_ray.features.speaker_norm import SpeakerNormError, speaker_normalize
from ser_ray.models import svm


def _table(seed: int = 0) -> pd.DataFrame:
    """3 speakers x 5 clips of 6 features, each speaker with its own offset and scale."""
    rng = np.random.default_rng(seed)
    rows = []
    for speaker in (1, 2, 3):
        for clip in range(5):
            values = speaker * 10 + speaker * rng.normal(size=6)
            rows.append(
                {
                    "path": f"Actor_{speaker:02d}/clip{clip}.wav",
                    "actor": speaker,
                    "emotion": ["neutral", "angry"][clip % 2],
                    "mfcc_stats": values[:4].astype(np.float32),
                    "egemaps": values[4:].astype(np.float32),
                }
            )
    return pd.DataFrame(rows)


def test_each_speaker_is_centred_and_scaled_on_its_own_clips():
    df = _table()
    X = svm.feature_set_matrix(df, "mfcc+egemaps", speaker_normalise=True)
    assert X.shape == (15, 6)
    for speaker in (1, 2, 3):
        block = X[df["actor"] == speaker]
        np.testing.assert_allclose(block.mean(axis=0), 0, atol=1e-9)
        np.testing.assert_allclose(block.std(axis=0), 1, atol=1e-6)
    raw = svm.feature_set_matrix(df, "mfcc+egemaps")
    rows = (df["actor"] == 2).to_numpy()
    expected = (raw[rows] - raw[rows].mean(axis=0)) / raw[rows].std(axis=0)
    np.testing.assert_allclose(X[rows], expected)


def test_a_speaker_is_unchanged_when_another_speakers_audio_changes():
    df = _table()
    before = svm.feature_set_matrix(df, "mfcc", speaker_normalise=True)
    other = (df["actor"] == 3).to_numpy()
    changed = df.assign(  # speaker 3's features change non-linearly (z-scores change too)
        mfcc_stats=[v**3 if o else v for v, o in zip(df["mfcc_stats"], other, strict=True)]
    )
    after = svm.feature_set_matrix(changed, "mfcc", speaker_normalise=True)
    for speaker in (1, 2):
        rows = (df["actor"] == speaker).to_numpy()
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


def _pooled_cache(root, values: np.ndarray, speakers: list[int]):
    """A finished pooled-layers feature cache (2 layers x 3) of ``values`` in ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ser_ray.distributed.feature_cache import DATA_DIR, INFO_FILE, FeatureCache

    data = root / "pooled-k" / DATA_DIR
    data.mkdir(parents=True)
    flat = pa.array(values.astype(np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, len(flat) + 1, 6, dtype=np.int32))
    table = pa.table({
        "path": [f"/c/{i:02d}.wav" for i in range(len(speakers))],
        "actor": pa.array(speakers, pa.int32()),
        "emotion": ["happy"] * len(speakers),
        "num_samples": pa.array([16000] * len(speakers), pa.int64()),
        "feature_rows": pa.array([2] * len(speakers), pa.int32()),
        "feature_dim": pa.array([3] * len(speakers), pa.int32()),
        "features": pa.ListArray.from_arrays(offsets, flat),
    })  # fmt: skip
    pq.write_table(table, data / "part-0.parquet")
    (root / "pooled-k" / INFO_FILE).write_text('{"key": "pooled-k", "kind": "pooled"}')
    return FeatureCache(data, "pooled", "pooled-k", len(speakers))


def _normalised_rows(tmp_path, values, speakers) -> dict[str, np.ndarray]:
    import pyarrow.dataset as pds

    from ser_ray.common.storage import list_column
    from ser_ray.distributed.feature_cache import speaker_normalised_cache

    cache = speaker_normalised_cache(_pooled_cache(tmp_path, values, speakers))
    assert cache.key == "pooled-k" and Path(cache.path).parent.name == "pooled-k-spknorm"
    table = pds.dataset(str(cache.path)).to_table()
    return dict(zip(table.column("path").to_pylist(), list_column(table, "features"), strict=True))


def test_ssl_speaker_statistics_of_a_speaker_come_from_its_own_clips_only(tmp_path):
    """The speaker-normalised pooled layers of a probe: each speaker's rows z-normalised
    over that speaker's own clips; another speaker's clips change nothing of them."""
    rng = np.random.default_rng(0)
    speakers = [1] * 4 + [2] * 5 + [3] * 3
    values = rng.normal(0.3, 0.05, (12, 6))
    rows = _normalised_rows(tmp_path / "a", values, speakers)
    own = values[:4]
    expected = (own - own.mean(axis=0)) / own.std(axis=0)
    for i in range(4):
        np.testing.assert_allclose(rows[f"/c/{i:02d}.wav"], expected[i], rtol=1e-5, atol=1e-5)
    changed = values.copy()
    changed[4:] = rng.normal(5.0, 2.0, (8, 6))  # speakers 2 and 3 sound very different
    again = _normalised_rows(tmp_path / "b", changed, speakers)
    for i in range(4):
        np.testing.assert_array_equal(again[f"/c/{i:02d}.wav"], rows[f"/c/{i:02d}.wav"])
    assert not np.allclose(again["/c/05.wav"], rows["/c/05.wav"])


def test_unknown_speaker_clips_are_pooled_per_side_never_across_sides():
    """An unknown speaker's clips are normalised over the unknown-speaker clips of their own
    split (never the train side's statistics for a test clip); known speakers as before."""
    from ser_ray.features.speaker_norm import normalisation_groups

    frame = pd.DataFrame(
        {
            "path": [f"c{i}.wav" for i in range(7)],
            "actor": [1, 1, 7, 8, 9, 10, 11],
            "speaker": ["a", "a", "?unknown-3", "?unknown-4", "?unknown-5", "?unknown-6", "b"],
            "split": ["train", "train", "train", "train", "test1", "test1", "test1"],
            "mfcc_stats": [np.array([v], np.float32) for v in (1, 3, 10, 30, 100, 300, 5)],
        }
    )
    groups = normalisation_groups(frame)
    assert groups[:2] == [1, 1] and groups[6] == 11
    assert groups[2] == groups[3] == "unknown speakers of split train"
    assert groups[4] == groups[5] == "unknown speakers of split test1"
    with pytest.raises(SpeakerNormError, match="speaker 11 has a single clip"):
        svm.feature_set_matrix(frame, "mfcc", speaker_normalise=True)
    both = svm.feature_set_matrix(frame.iloc[:6], "mfcc", speaker_normalise=True)
    assert both[:, 0].tolist() == [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]
    no_side = frame.iloc[:4].assign(split=None)
    with pytest.raises(SpeakerNormError, match="c2.wav has an unknown speaker and no split"):
        normalisation_groups(no_side)
