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


#: Writes a small demo corpus into argv[1], slowly when argv[2] == "slow" (it says when it
#: has started writing), and prints whether this process wrote it.
WRITER = """
import logging, sys, time
from ser_ray.corpus import demo_corpus

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
if sys.argv[2] == "slow":
    write_clip = demo_corpus._write_clip
    def slow(spec, **kwargs):
        print("writing", flush=True)
        time.sleep(0.2)
        write_clip(spec, **kwargs)
    demo_corpus._write_clip = slow
demo_corpus.write_demo_corpus(sys.argv[1], n_actors=2, clips_per_actor=6, seed=3)
print("returned", flush=True)
"""


@pytest.mark.slow
def test_a_second_writer_waits_for_the_first_and_writes_nothing(tmp_path):
    """Two jobs started at once on a cold cache write the same demo corpus: the second waits
    for the first (a lock beside the corpus), then finds it complete and writes nothing, so
    it never reads a clip the other is rewriting."""
    import subprocess
    import sys

    root = tmp_path / "corpus"
    first = subprocess.Popen([sys.executable, "-c", WRITER, str(root), "slow"],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert first.stdout.readline().strip() == "writing"  # it holds the lock
    second = subprocess.run([sys.executable, "-c", WRITER, str(root), "plain"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    rest = first.communicate(timeout=120)[0]
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert "demo corpus: 12 clips" in rest  # the first wrote it
    assert second.stdout.splitlines() == ["returned"]  # the second only read the marker
    assert "returned" not in rest.split("demo corpus:")[0]  # the first ended its writes first
    alone = write_demo_corpus(tmp_path / "alone", n_actors=2, clips_per_actor=6, seed=3)
    clips = sorted(p.relative_to(root) for p in root.rglob("*.wav"))
    assert len(clips) == 12
    for clip in clips:
        assert (root / clip).read_bytes() == (alone / clip).read_bytes()
