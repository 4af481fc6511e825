from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_ray.corpus import demo_corpus
from ser_ray.corpus.demo_corpus import clip_specs, speech_clip, synthesize, write_demo_corpus
from ser_ray.corpus.ravdess import build_manifest


def test_full_size_has_ravdess_counts():
    specs = clip_specs()
    assert len(specs) == 1440
    per_actor = [s for s in specs if s.actor == 7]
    assert len(per_actor) == 60
    emotions = [s.emotion_code for s in per_actor]
    assert emotions.count(1) == 4 and all(emotions.count(e) == 8 for e in range(2, 9))
    assert len({s.file_name for s in specs}) == 1440


def test_layout_format_and_determinism(tmp_path):
    root = write_demo_corpus(tmp_path / "a", n_actors=2, clips_per_actor=9, seed=3)
    again = write_demo_corpus(tmp_path / "b", n_actors=2, clips_per_actor=9, seed=3)
    m = build_manifest(str(root))
    assert len(m.clips) == 18 and not m.skipped and m.actors == [1, 2]
    for clip in m.clips:
        info = sf.info(clip.path)
        assert (info.samplerate, info.channels, info.subtype) == (48_000, 1, "PCM_16")
        twin = clip.path.replace(str(tmp_path / "a"), str(tmp_path / "b"))
        assert Path(clip.path).read_bytes() == Path(twin).read_bytes()
    assert again != root


@pytest.mark.slow
def test_a_process_pool_writes_the_same_clips_as_one_process(tmp_path, monkeypatch):
    serial = write_demo_corpus(tmp_path / "serial", n_actors=2, clips_per_actor=5, seed=3)
    pool = demo_corpus.unlabeled_pool_clips(2, 3, speech_scale=0.3)
    monkeypatch.setattr(demo_corpus, "PARALLEL_MIN_CLIPS", 0)
    monkeypatch.setattr(demo_corpus.os, "sched_getaffinity", lambda pid: {0, 1})
    parallel = write_demo_corpus(tmp_path / "parallel", n_actors=2, clips_per_actor=5, seed=3)
    files = sorted(p.relative_to(serial) for p in serial.rglob("*.wav"))
    assert len(files) == 10
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*.wav"))
    for name in files:
        assert (serial / name).read_bytes() == (parallel / name).read_bytes()
    pool_again = demo_corpus.unlabeled_pool_clips(2, 3, speech_scale=0.3)
    assert [n for n, _ in pool_again] == [n for n, _ in pool] and len(pool) == 6
    for (_, a), (_, b) in zip(pool, pool_again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_clips_have_silence_at_both_ends_and_ravdess_length():
    y = synthesize(speech_clip(5, 2, 1, 1, 3))
    assert 2.9 <= y.size / 48_000 <= 5.3
    edge = int(0.3 * 48_000)
    loud = np.abs(y).max()
    assert np.abs(y[:edge]).max() < loud / 100 and np.abs(y[-edge:]).max() < loud / 100


def _f0_hz(y: np.ndarray, sr_hz: int = 48_000) -> float:
    """Median autocorrelation pitch over the voiced 40 ms frames."""
    frame = int(0.04 * sr_hz)
    lags = np.arange(sr_hz // 600, sr_hz // 60)
    level = np.abs(y).max()
    estimates = []
    for start in range(0, y.size - frame, frame):
        x = y[start : start + frame]
        if np.abs(x).max() < level / 4:
            continue
        ac = np.correlate(x, x, mode="full")[frame - 1 :]
        estimates.append(sr_hz / lags[np.argmax(ac[lags])])
    return float(np.median(estimates))


def test_emotion_and_gender_shape_the_voice():
    male, female = demo_corpus.actor_voice(1, 0), demo_corpus.actor_voice(2, 0)
    assert male.base_pitch_hz < 150 < female.base_pitch_hz
    sad = synthesize(speech_clip(4, 2, 1, 1, 2))
    surprised = synthesize(speech_clip(8, 2, 1, 1, 2))
    assert _f0_hz(surprised) > 1.25 * _f0_hz(sad)
    strong = demo_corpus.clip_prosody(speech_clip(5, 2, 1, 1, 2), female)
    normal = demo_corpus.clip_prosody(speech_clip(5, 1, 1, 1, 2), female)
    assert strong.energy_db > normal.energy_db > 0
