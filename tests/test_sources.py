"""Readers of clip manifests, CREMA-D folders and EmoBox files (tiny files in tmp_path)."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ser_ray.corpus.clips import CLIP_COLUMNS, CorpusError
from ser_ray.corpus.sources import (
    CREMAD_EMOTIONS,
    is_cremad_name,
    looks_like_cremad,
    read_corpus,
    read_cremad_folder,
    read_emobox_jsonl,
    read_manifest,
)


def write_wav(path: Path, seconds: float = 0.5, rate: int = 16_000) -> Path:
    """A short 440 Hz sine, as the clips of a real corpus would be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    return path


def touch(path: Path) -> Path:
    """A zero-byte placeholder (the readers never decode audio)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def values(column: pd.Series) -> list:
    """A column as a list, missing values as None (pandas may hold them as NaN)."""
    return [None if pd.isna(value) else value for value in column]


def write_jsonl(path: Path, objects: list[dict]) -> Path:
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objects))
    return path


# --- manifests --------------------------------------------------------------------------------

HEADER = ["path", "speaker", "label", "gender", "session", "notes"]
THREE = ["path", "speaker", "emotion"]


@pytest.fixture
def corpus(tmp_path):
    """(folder, its three wavs, manifest rows: two relative paths, one absolute)."""
    root = tmp_path.resolve()
    wavs = [write_wav(root / "audio" / f"{name}.wav") for name in ("a", "b", "c")]
    rows = [
        ["audio/a.wav", " spk1 ", "angry", "M", "s1", "loud"],
        ["./audio/b.wav", "spk2", "happy ", "female", "", ""],
        [str(wavs[2]), "spk1", "sad", "", "s2", "x"],
    ]
    return root, wavs, rows


def test_csv_manifest_reads_paths_against_its_folder(corpus):
    root, wavs, rows = corpus
    table = read_manifest(write_csv(root / "manifest.csv", HEADER, rows))
    frame = table.frame
    assert table.source == "manifest" and table.skipped == [] and len(frame) == 3
    assert list(frame.columns) == [*CLIP_COLUMNS, "notes"]
    assert list(frame["path"]) == [str(w) for w in wavs]
    assert list(frame["speaker"]) == ["spk1", "spk2", "spk1"]
    assert list(frame["emotion"]) == ["angry", "happy", "sad"]  # label read as emotion
    assert values(frame["gender"]) == ["male", "female", None]
    assert values(frame["session"]) == ["s1", None, "s2"]
    assert values(frame["fold"]) == [None] * 3 and values(frame["corpus"]) == [None] * 3
    assert list(frame["notes"]) == ["loud", "", "x"]
    assert list(frame["size_bytes"]) == [os.stat(w).st_size for w in wavs]
    assert list(frame["mtime_ns"]) == [os.stat(w).st_mtime_ns for w in wavs]
    assert table.labels == ["angry", "happy", "sad"]


def test_jsonl_manifest_gives_the_same_frame(corpus):
    root, _, rows = corpus
    from_csv = read_manifest(write_csv(root / "manifest.csv", HEADER, rows)).frame
    objects = [dict(zip(HEADER, row, strict=True)) for row in rows]
    objects[1].pop("notes")  # a key left out reads as empty, as an empty CSV cell
    from_jsonl = read_manifest(write_jsonl(root / "manifest.jsonl", objects)).frame
    pd.testing.assert_frame_equal(from_csv, from_jsonl)
    as_json = read_manifest(write_jsonl(root / "manifest.json", objects)).frame
    pd.testing.assert_frame_equal(from_csv, as_json)


def test_gender_spellings_and_column_case(tmp_path):
    wavs = [touch(tmp_path / f"{k}.wav") for k in range(4)]
    rows = [
        [w.name, "s", "calm", g] for w, g in zip(wavs, ["f", "Male", "FEMALE", "m"], strict=True)
    ]
    frame = read_manifest(
        write_csv(tmp_path / "m.csv", ["Path", "Speaker", "EMOTION", "Gender"], rows)
    ).frame
    assert list(frame["gender"]) == ["female", "male", "female", "male"]


def test_uri_paths_are_kept_and_not_looked_at(tmp_path):
    rows = [["s3://bucket/clips/a.wav", "1", "sad"]]
    frame = read_manifest(write_csv(tmp_path / "m.csv", THREE, rows)).frame
    assert frame.loc[0, "path"] == "s3://bucket/clips/a.wav"
    assert (frame.loc[0, "size_bytes"], frame.loc[0, "mtime_ns"]) == (-1, -1)


def manifest_error(tmp_path: Path, header: list[str], rows: list[list[str]]) -> str:
    """The message of the CorpusError that bad.csv (next to a.wav and b.wav) raises."""
    touch(tmp_path / "a.wav")
    touch(tmp_path / "b.wav")
    with pytest.raises(CorpusError) as err:
        read_manifest(write_csv(tmp_path / "bad.csv", header, rows))
    return str(err.value)


def test_missing_required_column_names_the_present_ones(tmp_path):
    message = manifest_error(tmp_path, ["path", "speaker", "mood"], [["a.wav", "1", "sad"]])
    assert "bad.csv: missing column(s) emotion" in message
    assert "the manifest has path, speaker, mood" in message
    assert "emotion (or label)" in message


@pytest.mark.parametrize(
    "header, rows, expected",
    [
        (THREE, [["", "1", "sad"], ["b.wav", "1", "sad"]], "empty path: row 1."),
        (
            ["path", "speaker", "label"],
            [["a.wav", "1", "x"], ["b.wav", "1", ""]],
            "empty emotion: row 2",
        ),
        (
            [*THREE, "gender"],
            [["a.wav", "1", "sad", "F"], ["b.wav", "1", "sad", "woman"]],
            "unknown gender: row 2 ('woman'). Fix: write male or female (or m/f)",
        ),
    ],
)
def test_bad_rows_are_named(tmp_path, header, rows, expected):
    message = manifest_error(tmp_path, header, rows)
    assert message.startswith(f"{tmp_path / 'bad.csv'}: ")
    assert expected in message


def test_empty_and_unknown_speakers_are_one_pseudo_speaker_each(tmp_path):
    for name in ("a.wav", "b.wav", "c.wav", "d.wav"):
        touch(tmp_path / name)
    rows = [["a.wav", "7", "sad"], ["b.wav", "", "sad"], ["c.wav", "UNKNOWN", "sad"]]
    rows.append(["d.wav", "n/a", "sad"])
    table = read_manifest(write_csv(tmp_path / "m.csv", THREE, rows))
    assert table.frame["speaker"].tolist() == ["7", "?unknown-2", "?unknown-3", "n/a"]
    table = read_manifest(write_csv(tmp_path / "m.csv", THREE, rows), unknown_speaker="N/A")
    assert table.frame["speaker"].tolist() == ["7", "?unknown-2", "UNKNOWN", "?unknown-4"]


def test_missing_file_names_row_path_and_fix(tmp_path):
    rows = [["a.wav", "1", "sad"], ["b.wav", "1", "sad"], ["gone/c.wav", "2", "sad"]]
    message = manifest_error(tmp_path, THREE, rows)
    missing = os.path.join(tmp_path.resolve(), "gone", "c.wav")
    assert "bad.csv" in message
    assert f"no such file: row 3 ({missing!r})" in message
    assert f"relative paths are read against {tmp_path.resolve()}" in message


def test_same_file_twice_names_both_rows(tmp_path):
    rows = [["a.wav", "1", "sad"], ["b.wav", "1", "sad"], ["./a.wav", "1", "sad"]]
    message = manifest_error(tmp_path, THREE, rows)
    path = str(tmp_path.resolve() / "a.wav")
    assert f"the same file as an earlier row: row 3 ({path!r}, as row 1)" in message


def test_many_bad_rows_are_listed_ten_and_counted(tmp_path):
    rows = [[f"x{k}.wav", "1", "sad"] for k in range(1, 16)]
    message = manifest_error(tmp_path, THREE, rows)
    assert re.search(r"no such file: row 1 \(.*row 10 \('[^']*x10\.wav'\) and 5 more\.", message)
    assert "row 11" not in message


def test_every_problem_is_reported_at_once(tmp_path):
    touch(tmp_path / "a.wav")
    rows = [["a.wav", "1", "", "f"], ["nope.wav", "1", "sad", "q"]]
    with pytest.raises(CorpusError, match=r"bad\.csv") as err:
        read_manifest(
            write_csv(tmp_path / "bad.csv", ["path", "speaker", "emotion", "gender"], rows)
        )
    message = str(err.value)
    assert message.startswith(f"{tmp_path.resolve() / 'bad.csv'}: 2 rows with problems:\n")
    assert "empty emotion: row 1" in message and "unknown gender: row 2 ('q')" in message
    assert "no such file: row 2" in message


def test_unknown_extension_and_empty_manifest(tmp_path):
    (tmp_path / "clips.txt").write_text("path,speaker,emotion\n")
    with pytest.raises(CorpusError, match=r"clips\.txt: unknown manifest type '\.txt'.*\.csv"):
        read_manifest(tmp_path / "clips.txt")
    write_csv(tmp_path / "empty.csv", THREE, [])
    with pytest.raises(CorpusError, match=r"empty\.csv: no clips"):
        read_manifest(tmp_path / "empty.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CorpusError, match=r"empty\.jsonl: no clips"):
        read_manifest(tmp_path / "empty.jsonl")
    with pytest.raises(CorpusError, match=r"absent\.csv: no such file"):
        read_manifest(tmp_path / "absent.csv")


def test_bad_json_line_is_named(tmp_path):
    touch(tmp_path / "a.wav")
    (tmp_path / "m.jsonl").write_text(
        '{"path": "a.wav", "speaker": "1", "emotion": "sad"}\n{"path": "b.wav",\n'
    )
    with pytest.raises(CorpusError, match=r"m\.jsonl: not valid JSON .*: row 2"):
        read_manifest(tmp_path / "m.jsonl")


# --- CREMA-D ----------------------------------------------------------------------------------

SPEAKERS = {"1001": "Male", "1002": "Female", "1003": "Female"}
SENTENCES = ["DFA", "IEO", "TIE", "IOM", "IWW", "TAI"]


@pytest.fixture
def cremad(tmp_path):
    """3 speakers x 6 emotions, plus a bad name, an mp3 twin, docs and hidden files."""
    root = tmp_path.resolve() / "AudioWAV"
    for speaker in SPEAKERS:
        for sentence, code in zip(SENTENCES, CREMAD_EMOTIONS, strict=True):
            touch(root / f"{speaker}_{sentence}_{code}_{'HI' if code == 'ANG' else 'XX'}.wav")
    touch(root / "hello.wav")
    touch(root / "1001_DFA_ANG_HI.mp3")  # the same clip again
    (root / "README.txt").write_text("CREMA-D")
    touch(root / ".DS_Store")
    touch(root / "__MACOSX" / "1001_DFA_ANG_HI.wav")
    demographics = tmp_path / "VideoDemographics.csv"
    write_csv(
        demographics,
        ["ActorID", "Age", "Sex", "Race", "Ethnicity"],
        [[speaker, "30", sex, "Caucasian", "Not Hispanic"] for speaker, sex in SPEAKERS.items()],
    )
    return root, demographics


def test_cremad_folder(cremad):
    root, demographics = cremad
    table = read_cremad_folder(str(root), demographics=str(demographics))
    frame = table.frame
    assert table.source == "cremad" and table.label_order is None
    assert len(frame) == 18
    assert list(frame["path"]) == sorted(frame["path"]) and frame["path"].is_unique
    assert list(frame.columns) == [*CLIP_COLUMNS, "sentence", "level"]
    assert sorted(frame["speaker"].unique()) == ["1001", "1002", "1003"]
    assert table.labels == ["angry", "disgust", "fearful", "happy", "neutral", "sad"]
    first = frame.set_index("path").loc[str(root / "1001_DFA_ANG_HI.wav")]
    assert (first["speaker"], first["emotion"], first["gender"]) == ("1001", "angry", "male")
    assert (first["sentence"], first["level"]) == ("DFA", "HI")
    sad = frame.set_index("path").loc[str(root / "1002_TAI_SAD_XX.wav")]
    assert (sad["emotion"], sad["gender"], sad["level"]) == ("sad", "female", "XX")
    assert dict(zip(frame["speaker"], frame["gender"], strict=True)) == {
        "1001": "male", "1002": "female", "1003": "female"
    }  # fmt: skip
    skipped = dict(table.skipped)
    assert set(skipped) == {str(root / "hello.wav"), str(root / "1001_DFA_ANG_HI.mp3")}
    assert "SSSS_SEN_EMO_LVL" in skipped[str(root / "hello.wav")]
    assert "same clip as" in skipped[str(root / "1001_DFA_ANG_HI.mp3")]


def test_cremad_folder_without_demographics_and_as_uri(cremad):
    root, _ = cremad
    frame = read_cremad_folder(str(root)).frame
    assert len(frame) == 18 and frame["gender"].isna().all()
    assert (frame["size_bytes"] == 0).all()  # zero-byte placeholders
    uri_frame = read_cremad_folder(f"file://{root}").frame
    assert list(uri_frame["path"]) == [f"file://{p}" for p in frame["path"]]


def test_cremad_bad_demographics(cremad, tmp_path):
    root, _ = cremad
    bad = write_csv(tmp_path / "demo.csv", ["ActorID", "Sex"], [["1001", "Male"], ["1002", "X"]])
    with pytest.raises(CorpusError, match=r"demo\.csv: unknown Sex: row 2 \('X'\)"):
        read_cremad_folder(str(root), demographics=str(bad))
    no_sex = write_csv(tmp_path / "demo2.csv", ["ActorID", "Gender"], [["1001", "Male"]])
    with pytest.raises(CorpusError, match=r"demo2\.csv: missing column\(s\) Sex; it has ActorID"):
        read_cremad_folder(str(root), demographics=str(no_sex))


def test_cremad_folder_without_cremad_clips(tmp_path):
    touch(tmp_path / "03-01-05-02-01-01-12.wav")
    with pytest.raises(CorpusError, match="no CREMA-D clips .*1 files skipped"):
        read_cremad_folder(str(tmp_path))
    with pytest.raises(CorpusError, match="not a folder"):
        read_cremad_folder(str(tmp_path / "absent"))


def test_cremad_names(cremad, tmp_path):
    assert is_cremad_name("1001_DFA_ANG_XX.wav") and is_cremad_name("x/1091_WSI_NEU_LO.flac")
    assert not is_cremad_name("1001_DFA_BOR_XX.wav")  # no such emotion
    assert not is_cremad_name("1001_DFA_ANG_QQ.wav")  # no such level
    assert not is_cremad_name("101_DFA_ANG_XX.wav") and not is_cremad_name(
        "03-01-05-02-01-01-12.wav"
    )
    root, _ = cremad
    assert looks_like_cremad(str(root))
    ravdess = tmp_path / "ravdess"
    touch(ravdess / "03-01-05-02-01-01-12.wav")
    touch(ravdess / "1001_DFA_ANG_XX.wav")
    assert not looks_like_cremad(str(ravdess))  # half is not most
    assert not looks_like_cremad(str(tmp_path / "absent"))


# --- EmoBox -----------------------------------------------------------------------------------


def emobox_objects(keys: list[str]) -> list[dict]:
    return [
        {
            "key": key,
            "dataset": "cafe",
            "wav": f"downloads/cafe/{key.removeprefix('cafe-')}.wav",
            "length": 3.5,
            "emo": emo,
        }
        for key, emo in zip(keys, ["p", "j", "n"], strict=False)
    ]


@pytest.fixture
def emobox(tmp_path):
    """An EmoBox checkout: data/cafe/cafe.jsonl, its wavs under downloads/ (relative to the
    checkout, not to the jsonl)."""
    root = tmp_path.resolve()
    objects = emobox_objects(["cafe-08-P-2-1", "cafe-10-J-1-2", "cafe-10-N-1-1"])
    for obj in objects:
        touch(root / obj["wav"])
    (root / "data" / "cafe").mkdir(parents=True)
    return root, write_jsonl(root / "data" / "cafe" / "cafe.jsonl", objects)


def test_emobox_with_speaker_regex(emobox):
    root, jsonl = emobox
    table = read_emobox_jsonl(jsonl, speaker_regex=r"^cafe-(\d+)-", audio_root=str(root))
    frame = table.frame
    assert table.source == "emobox" and len(frame) == 3
    assert list(frame["speaker"]) == ["08", "10", "10"]
    assert list(frame["emotion"]) == ["p", "j", "n"]
    assert list(frame["key"]) == ["cafe-08-P-2-1", "cafe-10-J-1-2", "cafe-10-N-1-1"]
    assert list(frame["corpus"]) == ["cafe"] * 3
    assert frame.loc[0, "path"] == str(root / "downloads" / "cafe" / "08-P-2-1.wav")


def test_emobox_paths_relative_to_the_jsonl_and_regex_on_wav(tmp_path):
    objects = [
        {"key": "u1", "wav": "wav/spk_A/u1.wav", "length": 1.0, "emo": "ang"},
        {"key": "u2", "wav": "wav/spk_B/u2.wav", "length": 1.0, "emo": "hap"},
    ]
    for obj in objects:
        write_wav(tmp_path / obj["wav"])
    frame = read_emobox_jsonl(write_jsonl(tmp_path / "d.jsonl", objects), r"spk_[A-Z]").frame
    assert list(frame["speaker"]) == ["spk_A", "spk_B"]  # whole match: no group
    assert list(frame["path"]) == [str(tmp_path.resolve() / obj["wav"]) for obj in objects]


def test_emobox_with_speaker_column_and_json_form(emobox):
    root, jsonl = emobox
    objects = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for obj, spk in zip(objects, ["a", "b", "b"], strict=True):
        obj["spk"] = spk
    with_column = write_jsonl(jsonl.with_name("spk.jsonl"), objects)
    frame = read_emobox_jsonl(with_column, speaker_column="spk", audio_root=str(root)).frame
    assert list(frame["speaker"]) == ["a", "b", "b"] and "spk" not in frame.columns
    as_json = jsonl.with_name("spk.json")  # EmoBox's .json: one object keyed by "key"
    as_json.write_text(json.dumps({obj.pop("key"): obj for obj in objects}, indent=4))
    from_json = read_emobox_jsonl(as_json, speaker_column="spk", audio_root=str(root)).frame
    pd.testing.assert_frame_equal(frame, from_json)


def test_emobox_needs_a_speaker(emobox):
    root, jsonl = emobox
    with pytest.raises(
        CorpusError,
        match=r"cafe\.jsonl: EmoBox files name no speaker; pass exactly one of speaker_column.*"
        r"speaker_regex=r'.*'cafe-08-P-2-1'",
    ):
        read_emobox_jsonl(jsonl, audio_root=str(root))
    with pytest.raises(CorpusError, match="speaker_column 'spk' is not a key.*key, dataset, wav"):
        read_emobox_jsonl(jsonl, speaker_column="spk", audio_root=str(root))
    with pytest.raises(CorpusError, match="not a valid regex"):
        read_emobox_jsonl(jsonl, speaker_regex="(", audio_root=str(root))


def test_emobox_regex_that_misses_names_the_rows(emobox):
    root, jsonl = emobox
    with pytest.raises(
        CorpusError,
        match=r"cafe\.jsonl: speaker_regex '-P-' does not match: row 2 \('cafe-10-J-1-2'\), "
        r"row 3 \('cafe-10-N-1-1'\)\. Fix: change speaker_regex",
    ):
        read_emobox_jsonl(jsonl, speaker_regex="-P-", audio_root=str(root))


def test_emobox_missing_audio(emobox):
    root, jsonl = emobox
    with pytest.raises(
        CorpusError, match=r"cafe\.jsonl: no such file: row 1 \(.*08-P-2-1\.wav'\).*audio_root"
    ):
        read_emobox_jsonl(jsonl, speaker_regex=r"^cafe-(\d+)-")  # wavs not beside the jsonl


# --- any source -------------------------------------------------------------------------------


def test_read_corpus_picks_the_reader_from_what_it_is_given(corpus, cremad, emobox, tmp_path):
    root, _, rows = corpus
    manifest = write_csv(root / "clips.csv", HEADER, rows)
    assert read_corpus(str(manifest)).source == "manifest"
    cremad_root, _ = cremad
    assert read_corpus(str(cremad_root)).source == "cremad"
    checkout, jsonl = emobox
    jsonl = write_jsonl(checkout / "cafe.jsonl", json_lines(jsonl))  # wav paths relative to it
    found = read_corpus(str(jsonl), speaker_regex=r"^cafe-(\d+)-")
    assert found.source == "emobox" and values(found.frame["speaker"]) == ["08", "10", "10"]
    with pytest.raises(CorpusError, match="EmoBox files name no speaker"):
        read_corpus(str(jsonl))
    ravdess = tmp_path / "ravdess" / "Actor_12"
    touch(ravdess / "03-01-05-02-01-01-12.wav")
    table = read_corpus(str(ravdess.parent))
    assert table.source == "ravdess" and values(table.frame["speaker"]) == ["12"]
    assert values(table.frame["gender"]) == ["female"] and table.label_order[0] == "neutral"


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
