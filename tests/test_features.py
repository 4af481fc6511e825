import csv
import json
import os
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from ser_ray.corpus.demo_corpus import speech_clip, synthesize
from ser_ray.distributed.prepare import prepare_features
from ser_ray.distributed.resources import plan_batches
from ser_ray.features import audio, featurize
from ser_ray.features.featurize import (
    FeatureConfig,
    load_features,
    rows_to_table,
    to_hf_dataset,
)

SR = 48_000


def _clip(emotion: int = 5, speaker: int = 1, rep: int = 1) -> np.ndarray:
    return synthesize(speech_clip(emotion, 1, 1, rep, speaker), speech_scale=0.4)


def _write(path: Path, y: np.ndarray, sr: int = SR, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, y, sr, **kw)
    return path


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> Path:
    """Every kind of bad input next to a few good clips; speakers 3..24 are missing."""
    root = tmp_path_factory.mktemp("bad_corpus")
    a1, a2 = root / "Actor_01", root / "Actor_02"
    good = _write(a1 / "03-01-05-01-01-01-01.wav", _clip())
    (a1 / "03-01-01-01-01-01-01.wav").write_bytes(b"")  # zero bytes
    (a1 / "03-01-02-01-01-01-01.wav").write_bytes(good.read_bytes()[:5000])  # truncated
    (a1 / "03-01-03-01-01-01-01.wav").write_text("I am a text file\n" * 20)  # text as .wav
    _write(a1 / "my_recording.wav", _clip(3))  # not a RAVDESS name
    stereo = np.stack([_clip(4), _clip(4) * 0.5], axis=1)
    _write(a1 / "03-01-04-01-01-01-01.wav", stereo)
    _write(a1 / "03-01-06-01-01-01-01.wav", _clip(6), subtype="PCM_U8")
    _write(a1 / "03-01-07-01-01-01-01.wav", _clip(7), subtype="PCM_24")
    _write(a1 / "03-01-08-01-01-01-01.wav", _clip(8), subtype="FLOAT")
    y441 = librosa.resample(_clip(3, 2), orig_sr=SR, target_sr=44_100)
    _write(a2 / "03-01-03-01-01-01-02.flac", y441, 44_100)
    _write(
        a2 / "03-01-04-01-01-01-02.mp3",
        librosa.resample(_clip(4, 2), orig_sr=SR, target_sr=44_100),
        44_100,
    )
    _write(a2 / "03-01-05-01-01-01-02.wav", np.zeros(SR, np.float32))  # all silent
    long_clip = np.tile(_clip(6, 2), 70)  # ~1.5 minutes
    _write(a2 / "03-01-06-01-01-01-02.wav", long_clip, subtype="PCM_16")
    return root


EXPECTED_REJECTIONS = {
    "03-01-01-01-01-01-01.wav": "empty file (0 bytes)",
    "03-01-02-01-01-01-01.wav": "truncated WAV",
    "03-01-03-01-01-01-01.wav": "cannot decode audio",
    "my_recording.wav": "not a RAVDESS name",
    "03-01-05-01-01-01-02.wav": "silent: peak",
    "03-01-06-01-01-01-02.wav": "too long",
}
EXPECTED_OK = {
    "03-01-05-01-01-01-01.wav",
    "03-01-04-01-01-01-01.wav",
    "03-01-06-01-01-01-01.wav",
    "03-01-07-01-01-01-01.wav",
    "03-01-08-01-01-01-01.wav",
    "03-01-03-01-01-01-02.flac",
    "03-01-04-01-01-01-02.mp3",
}


@pytest.fixture(scope="module")
def prepared_bad(ray_local, bad_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared_bad")
    result = prepare_features(bad_corpus, out, FeatureConfig(batch_size=4), runner="ray")
    return result, bad_corpus


def test_every_input_is_accounted_for(prepared_bad):
    result, corpus = prepared_bad
    n_files = sum(1 for p in corpus.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert result.n_input == n_files == len(EXPECTED_OK) + len(EXPECTED_REJECTIONS)
    df = load_features(result.features_dir)
    assert {Path(p).name for p in df.path} == EXPECTED_OK
    with open(result.rejected_csv) as f:
        rejected = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(f)}
    assert set(rejected) == set(EXPECTED_REJECTIONS)
    for name, reason in EXPECTED_REJECTIONS.items():
        assert reason in rejected[name], (name, rejected[name])
    assert result.n_ok + result.n_rejected == result.n_input
    config = json.loads((Path(result.out_dir) / "config.json").read_text())
    assert config["counts"] == {"input": 13, "ok": 7, "rejected": 6}
    assert config["actors"] == [1, 2] and config["source"] == "ravdess"


def test_feature_rows_hold_16k_audio_and_librosa_mfcc(prepared_bad):
    result, corpus = prepared_bad
    df = load_features(result.features_dir).set_index(
        load_features(result.features_dir).path.map(lambda p: Path(p).name)
    )
    assert (df.sample_rate_hz == 16_000).all()
    for _, row in df.iterrows():
        assert row.num_samples == len(row.waveform)
        assert row.duration_s == pytest.approx(row.num_samples / 16_000)
        assert len(row.mfcc_stats) == 80 and row.speaker == str(row.actor)
        assert row.gender == ("male" if row.actor % 2 else "female") and pd.isna(row.fold)
    # length after resampling: 48 kHz PCM -> exactly a third of the samples
    wav = corpus / "Actor_01" / "03-01-07-01-01-01-01.wav"
    assert df.loc[wav.name].num_samples == -(-sf.info(wav).frames // 3)  # ceil, as librosa
    # stereo is downmixed; MFCCs equal librosa's on the same signal
    stereo_row = df.loc["03-01-04-01-01-01-01.wav"]
    y, _ = librosa.load(corpus / "Actor_01" / stereo_row.name, sr=16_000, mono=True)
    np.testing.assert_allclose(stereo_row.waveform, y, atol=1e-4)
    reference = librosa.feature.mfcc(y=np.asarray(stereo_row.waveform), sr=16_000, n_mfcc=40)
    np.testing.assert_allclose(stereo_row.mfcc_mean, reference.mean(axis=1), rtol=1e-4, atol=1e-3)
    assert df.loc["03-01-05-01-01-01-01.wav"][["actor", "emotion", "gender"]].tolist() == [
        1, "angry", "male"
    ]  # fmt: skip


def test_egemaps_equal_opensmiles_own_output(prepared_bad):
    import opensmile

    result, _ = prepared_bad
    df = load_features(result.features_dir, ["path", "waveform", "egemaps"])
    smile = opensmile.Smile(
        feature_set=opensmile.FeatureSet.eGeMAPSv02,
        feature_level=opensmile.FeatureLevel.Functionals,
    )
    row = df.iloc[0]
    theirs = smile.process_signal(np.asarray(row.waveform), 16_000)
    assert theirs.shape == (1, 88) and len(row.egemaps) == 88
    np.testing.assert_array_equal(row.egemaps, theirs.to_numpy(dtype=np.float32)[0])
    assert all(np.isfinite(v).all() and len(v) == 88 for v in df.egemaps)


def test_features_without_egemaps_are_refused_not_silently_empty(prepared_bad, tmp_path):
    result, _ = prepared_bad
    table = pq.read_table(sorted(Path(result.features_dir).glob("part-*.parquet"))[0])
    old = tmp_path / "old" / "features"  # as an earlier version wrote it: no egemaps column
    old.mkdir(parents=True)
    pq.write_table(table.drop_columns(["egemaps"]), old / "part-00000.parquet")
    (old / "_SUCCESS").write_text("")
    with pytest.raises(ValueError, match=r"older ser_ray without column\(s\) \['egemaps'\]"):
        load_features(old, ["path", "egemaps"])
    assert len(load_features(old, ["path", "mfcc_stats"])) == table.num_rows
    empty = tmp_path / "no_egemaps" / "features"  # prepared with egemaps=False
    empty.mkdir(parents=True)
    nulls = pa.nulls(table.num_rows, table.schema.field("egemaps").type)
    pq.write_table(table.set_column(table.schema.get_field_index("egemaps"), "egemaps", nulls),
                   empty / "part-00000.parquet")  # fmt: skip
    (empty / "_SUCCESS").write_text("")
    with pytest.raises(ValueError, match="prepared without eGeMAPS"):
        load_features(empty, ["path", "egemaps"])


def test_feature_files_are_written_by_the_tasks_in_input_order(prepared_bad):
    result, _ = prepared_bad
    files = sorted(Path(result.features_dir).glob("part-*.parquet"))
    # 13 inputs, 6 rejected before or in the tasks; batch_size=4 caps each task's file
    assert len(files) >= 2 and all(pq.ParquetFile(f).metadata.num_rows <= 4 for f in files)
    paths = list(load_features(result.features_dir, ["path"]).path)
    assert paths == sorted(paths)  # manifest order survives the parallel writes


def test_in_process_runner_writes_what_ray_writes(prepared_bad, tmp_path):
    """A small corpus is featurized without Ray (``auto``): same files, rows and rejections."""
    result, corpus = prepared_bad

    def must_not_start_ray() -> None:
        raise AssertionError("13 clips must not start Ray")

    local = prepare_features(corpus, tmp_path, FeatureConfig(batch_size=4), must_not_start_ray)
    assert local.runner == "in-process" and result.runner == "ray"
    assert json.loads((tmp_path / "config.json").read_text())["runner"] == "in-process"
    tables = [
        pa.concat_tables(
            pq.read_table(f) for f in sorted(Path(r.features_dir).glob("part-*.parquet"))
        )
        for r in (local, result)
    ]
    assert tables[0].num_rows == len(EXPECTED_OK)
    mfcc = ["mfcc_mean", "mfcc_std", "mfcc_stats"]
    assert tables[0].drop_columns(mfcc).equals(tables[1].drop_columns(mfcc))
    for name in mfcc:  # BLAS threads differ (Ray workers run one): last-bit differences
        np.testing.assert_allclose(
            np.stack(tables[0].column(name).to_numpy(zero_copy_only=False)),
            np.stack(tables[1].column(name).to_numpy(zero_copy_only=False)),
            rtol=1e-5, atol=1e-4,
        )  # fmt: skip
    assert Path(local.rejected_csv).read_text() == Path(result.rejected_csv).read_text()
    with pytest.raises(ValueError, match="runner='threads': choose one of auto, in-process, ray"):
        prepare_features(corpus, tmp_path / "x", runner="threads")


def test_a_batch_is_written_a_few_clips_at_a_time(prepared_bad, tmp_path, monkeypatch):
    """One batch of 13 clips in chunks of 3: one file, row groups of at most 3 usable clips,
    the same rows as writing the batch in one go (a worker holds only a chunk's waveforms)."""
    _, corpus = prepared_bad
    whole = prepare_features(corpus, tmp_path / "whole", FeatureConfig(batch_size=13))
    monkeypatch.setattr(featurize, "WRITE_CHUNK_CLIPS", 3)
    chunked = prepare_features(corpus, tmp_path / "chunked", FeatureConfig(batch_size=13))
    (file,) = sorted(Path(chunked.features_dir).glob("part-*.parquet"))
    groups = [pq.ParquetFile(file).metadata.row_group(i).num_rows
              for i in range(pq.ParquetFile(file).metadata.num_row_groups)]  # fmt: skip
    assert sum(groups) == len(EXPECTED_OK) and len(groups) > 1 and max(groups) <= 3
    assert pq.read_table(file).equals(pq.read_table(Path(whole.features_dir) / file.name))
    assert Path(chunked.rejected_csv).read_text() == Path(whole.rejected_csv).read_text()


def test_rows_to_table_equals_pyarrows_row_conversion():
    rows = [
        {"path": "a.wav", "waveform": np.arange(5, dtype=np.float32), "reject_reason": None},
        {"path": "b.wav", "waveform": None, "reject_reason": "empty file (0 bytes)"},
        {"path": "c.wav", "waveform": np.zeros(0, np.float32), "reject_reason": None},
    ]
    floats = pa.list_(pa.float32())
    text = pa.string()
    schema = pa.schema([("path", text), ("waveform", floats), ("reject_reason", text)])
    table = rows_to_table(rows, schema)
    assert table.equals(pa.Table.from_pylist(rows, schema=schema))
    assert table.column("waveform").to_pylist() == [[0.0, 1.0, 2.0, 3.0, 4.0], None, []]


def test_tasks_per_cpu_and_batch_cap():
    assert plan_batches(24, 2, 64) == (3, 8)  # small corpus: every CPU busy
    assert plan_batches(1440, 2, 64) == (64, 23)  # capped: bounded memory per task
    assert plan_batches(1, 16, 64) == (1, 1)
    per_task, tasks = plan_batches(1000, 3, 50)
    assert per_task * tasks >= 1000 > per_task * (tasks - 1)


def test_rerun_is_skipped_until_input_or_config_changes(prepared_bad):
    result, corpus = prepared_bad

    def must_not_start_ray() -> None:
        raise AssertionError("a re-run on unchanged input must not need Ray")

    again = prepare_features(
        corpus, result.out_dir, FeatureConfig(batch_size=4), connect=must_not_start_ray
    )
    assert again.reused and again.n_ok == result.n_ok
    wav = corpus / "Actor_01" / "03-01-07-01-01-01-01.wav"
    os.utime(wav, ns=(wav.stat().st_atime_ns, wav.stat().st_mtime_ns + 10**9))
    connected = []
    changed = prepare_features(
        corpus, result.out_dir, FeatureConfig(batch_size=4), lambda: connected.append(1), "ray"
    )
    assert not changed.reused and changed.n_ok == result.n_ok and connected == [1]
    deltas = prepare_features(corpus, result.out_dir, FeatureConfig(batch_size=4, mfcc_deltas=True))
    assert not deltas.reused
    assert len(load_features(deltas.features_dir, ["mfcc_stats"]).mfcc_stats[0]) == 160


@pytest.mark.parametrize("runner", ["in-process", "ray"])
def test_egemaps_are_added_later_without_redoing_the_rest(prepared_bad, tmp_path, monkeypatch,
                                                          runner):  # fmt: skip
    """A folder prepared without eGeMAPS gains the column (the values computing it at once
    gives, everything else untouched, no clip featurized again); a run without eGeMAPS then
    reuses the folder as it is."""
    from ser_ray.distributed import prepare

    _, corpus = prepared_bad
    at_once = prepare_features(corpus, tmp_path / "at_once", FeatureConfig(batch_size=4))
    later, without = tmp_path / "later", FeatureConfig(batch_size=4, egemaps=False)
    first = prepare_features(corpus, later, without, runner=runner)
    before = {f.name: pq.read_table(f) for f in Path(first.features_dir).glob("part-*.parquet")}
    assert all(t.column("egemaps").null_count == t.num_rows for t in before.values())

    def no_featurizing(*args, **kwargs):
        raise AssertionError("adding eGeMAPS must not featurize the clips again")

    monkeypatch.setattr(prepare, "featurize_batch", no_featurizing)
    monkeypatch.setattr(prepare, "_featurize_on_ray", no_featurizing)
    added = prepare_features(corpus, later, FeatureConfig(batch_size=4), runner=runner)
    assert added.reused and (added.n_ok, added.n_rejected) == (first.n_ok, first.n_rejected)
    after = {f.name: pq.read_table(f) for f in Path(added.features_dir).glob("part-*.parquet")}
    assert after.keys() == before.keys()
    for name, table in after.items():
        assert table.drop_columns(["egemaps"]).equals(before[name].drop_columns(["egemaps"]))
        assert table.column("egemaps").null_count == 0
    whole = load_features(at_once.features_dir, ["path", "egemaps"])
    gained = load_features(added.features_dir, ["path", "egemaps"])
    assert list(gained.path) == list(whole.path)
    np.testing.assert_array_equal(np.stack(gained.egemaps), np.stack(whole.egemaps))
    record = json.loads((later / "config.json").read_text())
    assert record["features"]["egemaps"] is True and record["egemaps_added_s"] >= 0
    assert not list(Path(added.features_dir).glob("*.partial"))

    def must_not_start_ray() -> None:
        raise AssertionError("a folder with eGeMAPS serves a run without them as it is")

    again = prepare_features(corpus, later, without, must_not_start_ray, runner)
    assert again.reused
    assert {
        f.name: pq.read_table(f) for f in Path(again.features_dir).glob("part-*.parquet")
    } == after


def test_demo_features_load_as_hf_dataset(demo_features):
    ds = to_hf_dataset(
        demo_features / "features", columns=["path", "actor", "speaker", "mfcc_stats"]
    )
    assert ds.num_rows == 24 * 16
    assert sorted(set(ds["actor"])) == list(range(1, 25))
    row = ds[0]
    assert len(row["mfcc_stats"]) == 80 and row["speaker"] == str(row["actor"])


def test_saved_hf_dataset_is_accepted_as_input(ray_local, demo_corpus, demo_features, tmp_path):
    import datasets

    files = sorted(demo_corpus.glob("Actor_0[12]/*.wav"))[:6]
    hf = datasets.Dataset.from_dict(
        {"audio": [{"bytes": f.read_bytes(), "path": f.name} for f in files]}
    ).cast_column("audio", datasets.Audio(decode=False))
    hf.save_to_disk(tmp_path / "hf_copy")
    result = prepare_features(tmp_path / "hf_copy", tmp_path / "out", runner="ray")
    assert (result.n_input, result.n_ok, result.n_rejected) == (6, 6, 0)
    got = load_features(result.features_dir).set_index("path")
    ref = load_features(demo_features / "features").set_index("path")
    for f in files:
        np.testing.assert_allclose(
            got.loc[f.name].mfcc_stats, ref.loc[str(f)].mfcc_stats, rtol=1e-6
        )


@pytest.mark.slow
def test_saved_hf_dataset_with_speaker_and_label_columns(demo_corpus, tmp_path):
    """A corpus saved with datasets: speaker and emotion from its columns (a ClassLabel by
    name), not from file names."""
    import datasets

    files = sorted(demo_corpus.glob("Actor_0[12]/*.wav"))[:4]
    hf = (
        datasets.Dataset.from_dict(
            {
                "audio": [
                    {"bytes": f.read_bytes(), "path": f"clip{i}.wav"} for i, f in enumerate(files)
                ],
                "speaker_id": ["ann", "ann", "bob", "bob"],
                "label": [0, 1, 1, 0],
            }
        )
        .cast_column("audio", datasets.Audio(decode=False))
        .cast_column("label", datasets.ClassLabel(names=["calm", "joy"]))
    )
    hf.save_to_disk(tmp_path / "hf_copy")
    result = prepare_features(tmp_path / "hf_copy", tmp_path / "out")
    assert (result.n_input, result.n_ok, result.n_rejected) == (4, 4, 0)
    got = load_features(result.features_dir, ["path", "actor", "speaker", "emotion"])
    assert got.sort_values("path").values.tolist() == [
        ["clip0.wav", 1, "ann", "calm"],
        ["clip1.wav", 1, "ann", "joy"],
        ["clip2.wav", 2, "bob", "joy"],
        ["clip3.wav", 2, "bob", "calm"],
    ]


def test_uri_input(ray_local, demo_corpus, tmp_path):
    sub = tmp_path / "corpus" / "Actor_03"
    sub.mkdir(parents=True)
    for f in sorted((demo_corpus / "Actor_03").glob("*.wav"))[:3]:
        (sub / f.name).write_bytes(f.read_bytes())
    result = prepare_features(f"file://{tmp_path / 'corpus'}", tmp_path / "out")
    df = load_features(result.features_dir, ["path", "actor"])
    assert result.n_ok == 3 and all(p.startswith("file://") for p in df.path)
    assert audio.load_audio(df.path[0]).size > 0
