"""The protocol resolved once from a clip table (pure): folds, validation speakers, classes."""

from __future__ import annotations

import numpy as np
import pytest
from test_speaker_folds import RAVDESS_VALIDATION

from ser_ray.corpus import folds
from ser_ray.corpus.clips import (
    ClipTable,
    clip_frame,
    is_unknown_speaker,
    mark_unknown_speakers,
    speaker_numbers,
)
from ser_ray.corpus.folds import FoldError
from ser_ray.corpus.protocol import (
    DEV_GROUP,
    TRAIN_GROUP,
    Protocol,
    ProtocolSettings,
    parse_label_map,
    ravdess_protocol,
    resolve_protocol,
)
from ser_ray.corpus.ravdess import class_names


def corpus(rows: list[dict], kind: str = "manifest") -> ClipTable:
    return ClipTable(clip_frame(rows), [], kind)


def manifest_corpus(n_speakers=10, labels=("angry", "happy", "neutral", "sad"), per_label=3):
    """Speakers named ``spk-XX`` (half male), ``per_label`` clips of each label."""
    rows = []
    for s in range(n_speakers):
        for label in labels:
            for i in range(per_label):
                rows.append(
                    {
                        "path": f"/data/spk{s:02d}_{label}_{i}.wav",
                        "speaker": f"spk-{s:02d}",
                        "emotion": label,
                        "gender": "male" if s % 2 else "female",
                        "session": f"S{s // 2 + 1}",
                    }
                )
    return corpus(rows)


@pytest.mark.parametrize("scheme", ["contiguous", "emobox"])
@pytest.mark.parametrize("merge_calm", [False, True])
def test_ravdess_protocol_is_the_ravdess_folds(scheme, merge_calm):
    protocol = ravdess_protocol(scheme, merge_calm)
    assert protocol.scheme == scheme and protocol.classes == tuple(class_names(merge_calm))
    sets = folds.fold_sets(scheme)
    assert [list(f) for f in protocol.folds] == sets
    for k in range(1, 7):
        test, fit, val = protocol.split(k)
        assert test == sets[k - 1] and val == RAVDESS_VALIDATION[scheme][k - 1]
        assert sorted(test + fit + val) == list(range(1, 25))
    assert protocol.fold_of_speaker() == {a: k for k, s in enumerate(sets, 1) for a in s}
    again = Protocol.from_dict(protocol.to_dict())
    assert again == protocol


def test_protocol_json_names_speakers_and_round_trips(tmp_path):
    protocol = resolve_protocol(manifest_corpus(), ProtocolSettings(num_folds=5, n_val_speakers=2))
    protocol.save(tmp_path / "protocol.json")
    assert Protocol.load(tmp_path / "protocol.json") == protocol
    doc = protocol.to_dict()
    assert doc["scheme"] == "speaker-kfold" and doc["classes"] == [
        "angry",
        "happy",
        "neutral",
        "sad",
    ]
    assert doc["speakers"] == {str(k): f"spk-{k - 1:02d}" for k in range(1, 11)}
    for fold in doc["folds"]:
        assert len(fold["test_speakers"]) == 2 and len(fold["validation_speakers"]) == 2
        sides = [set(fold[key]) for key in ("test_speakers", "validation_speakers", "fit_speakers")]
        assert sum(map(len, sides)) == len(set.union(*sides)) == 10  # a partition
        # one male and one female speaker per test fold (5 + 5 speakers, 5 folds)
        genders = {int(s[-2:]) % 2 for s in fold["test_speakers"]}
        assert genders == {0, 1}


def test_auto_scheme_follows_the_corpus_kind():
    assert resolve_protocol(manifest_corpus(), ProtocolSettings()).scheme == "speaker-kfold"
    assert ravdess_protocol().scheme == "contiguous"


def test_session_and_predefined_protocols():
    table = manifest_corpus(n_speakers=8)
    by_session = resolve_protocol(table, ProtocolSettings(folds="session", n_val_speakers=1))
    assert by_session.fold_names == ("S1", "S2", "S3", "S4")
    assert [by_session.speakers[s] for f in by_session.folds for s in f] == [
        f"spk-{s:02d}" for s in range(8)
    ]
    table.frame["fold"] = table.frame["speaker"].map(lambda s: "B" if int(s[-2:]) < 3 else "A")
    given = resolve_protocol(table, ProtocolSettings(folds="predefined", n_val_speakers=1))
    assert given.fold_names == ("A", "B")
    assert [[given.speakers[s] for s in f] for f in given.folds] == [
        [f"spk-{s:02d}" for s in range(3, 8)],
        ["spk-00", "spk-01", "spk-02"],
    ]


def test_label_map_renames_merges_and_drops():
    assert parse_label_map("calm=neutral, surprised=-", merge_calm=False) == {
        "calm": "neutral",
        "surprised": None,
    }
    table = manifest_corpus(labels=("angry", "calm", "happy", "neutral", "surprised"))
    protocol = resolve_protocol(
        table, ProtocolSettings(label_map="calm=neutral,surprised=-,angry=anger", num_folds=5)
    )
    assert protocol.classes == ("anger", "happy", "neutral")  # sorted corpus labels, mapped
    assert protocol.dropped_labels == ["surprised"]
    assert protocol.class_indices(["calm", "neutral", "angry"]) == [2, 2, 0]
    with pytest.raises(ValueError, match="left out by the label map"):
        protocol.class_indices(["surprised"])
    with pytest.raises(ValueError, match=r"names labels \['fear'\] that the corpus does not"):
        resolve_protocol(table, ProtocolSettings(label_map="fear=anger"))
    with pytest.raises(ValueError, match="fewer than two classes"):
        resolve_protocol(
            table, ProtocolSettings(label_map="angry=x,calm=x,happy=x,neutral=x,surprised=-")
        )
    with pytest.raises(ValueError, match="write LABEL=CLASS"):
        ProtocolSettings(label_map="calm")


def test_errors_stop_before_any_work():
    table = manifest_corpus(n_speakers=4)
    with pytest.raises(FoldError, match="4 speakers cannot form 6 speaker-disjoint folds"):
        resolve_protocol(table, ProtocolSettings(num_folds=6, n_val_speakers=1))
    with pytest.raises(FoldError, match="validation speakers"):
        resolve_protocol(table, ProtocolSettings(num_folds=2, n_val_speakers=2))
    # a class only some speakers have: a fold whose training side lacks it is refused
    rows = manifest_corpus(n_speakers=6).frame.to_dict("records")
    rows += [{**rows[0], "path": "/data/rare.wav", "emotion": "rare"}]  # speaker spk-00 only
    with pytest.raises(
        FoldError, match=r"training speakers have no clips of class\(es\) \['rare'\]"
    ):
        resolve_protocol(corpus(rows), ProtocolSettings(num_folds=3, n_val_speakers=1))
    with pytest.raises(FoldError, match="cannot form the contiguous folds"):
        resolve_protocol(manifest_corpus(), ProtocolSettings(folds="contiguous"))


def test_a_saved_protocol_is_used_as_given_and_checked_against_the_corpus(tmp_path):
    table = manifest_corpus()
    first = resolve_protocol(table, ProtocolSettings(num_folds=5, seed=1, n_val_speakers=2))
    first.save(tmp_path / "protocol.json")
    given = ProtocolSettings(protocol_file=str(tmp_path / "protocol.json"), num_folds=2, seed=9)
    assert resolve_protocol(table, given) == first  # its folds, not the flags'
    fewer = corpus(table.frame[table.frame["speaker"] != "spk-03"].to_dict("records"))
    with pytest.raises(FoldError, match=r"speakers the corpus lacks: \['spk-03'\]"):
        resolve_protocol(fewer, given)


def test_no_generated_protocol_puts_a_speaker_on_two_sides():
    for seed in range(40):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(4, 30))
        rows = [
            {
                "path": f"/d/{s}_{c}.wav",
                "speaker": f"s{s}",
                "emotion": ["a", "b", "c"][c % 3],
                "gender": rng.choice(["male", "female", None]),
            }
            for s in range(n)
            for c in range(int(rng.integers(3, 9)))
        ]
        k = int(rng.integers(2, min(8, n - 1) + 1))
        n_val = int(rng.integers(0, max(1, n - n // k - 1)))
        settings = ProtocolSettings(num_folds=k, n_val_speakers=n_val, seed=seed)
        protocol = resolve_protocol(corpus(rows), settings)
        everyone = set(protocol.speakers)
        for fold in protocol.fold_numbers:
            test, fit, val = protocol.split(fold)
            assert not set(test) & set(fit) and not set(test) & set(val)
            assert not set(fit) & set(val) and len(val) == n_val
            assert set(test) | set(fit) | set(val) == everyone


# --- official partitions with unknown speakers -------------------------------------------


def partition_corpus(unknown_every: int = 20) -> ClipTable:
    """Speakers spk-00..spk-11 in train (6), dev (2), test1 (2), test2 (2); every
    ``unknown_every``-th clip (5%) has an unknown speaker, its split kept."""
    split_of = ["train"] * 6 + ["dev"] * 2 + ["test1"] * 2 + ["test2"] * 2
    rows = [
        {
            "path": f"/data/spk{s:02d}_{label}_{i}.wav",
            "speaker": f"spk-{s:02d}",
            "emotion": label,
            "split": split_of[s],
        }
        for s in range(12)
        for label in ("angry", "happy", "sad")
        for i in range(5)
    ]
    for i, row in enumerate(rows):
        if i % unknown_every == 0:
            row["speaker"] = "Unknown" if i % 40 else ""
    return mark_unknown_speakers(corpus(rows))


def test_partitions_train_on_train_choose_on_dev_and_test_each_test_set():
    table = partition_corpus()
    unknown = table.frame[table.frame["speaker"].map(is_unknown_speaker)]
    assert len(unknown) == len(table.frame) // 20  # 5%
    protocol = resolve_protocol(table, ProtocolSettings(folds="predefined"))
    assert protocol.scheme == "partitions" and protocol.fold_names == ("test1", "test2")
    numbers = speaker_numbers(table.frame["speaker"])
    by_split = {
        side: sorted(numbers[s] for s in set(table.frame.loc[table.frame["split"] == side].speaker))
        for side in ("train", "dev", "test1", "test2")
    }
    for k, name in enumerate(("test1", "test2"), 1):
        test, fit, val = protocol.split(k)
        assert test == by_split[name]  # its unknown clips too, each its own speaker
        assert fit == by_split["train"] and val == by_split["dev"]
    groups = protocol.fold_of_speaker()
    assert {groups[s] for s in by_split["train"]} == {TRAIN_GROUP}
    assert {groups[s] for s in by_split["dev"]} == {DEV_GROUP}
    assert {groups[s] for s in by_split["test2"]} == {2}
    again = Protocol.from_dict(protocol.to_dict())
    assert again == protocol
    assert [f["name"] for f in protocol.to_dict()["folds"]] == ["test1", "test2"]


def test_a_known_speaker_in_two_splits_is_refused_in_one_line():
    table = partition_corpus()
    frame = table.frame
    frame.loc[frame["path"] == "/data/spk03_sad_4.wav", "split"] = "test2"
    with pytest.raises(FoldError) as err:
        resolve_protocol(table, ProtocolSettings(folds="predefined"))
    message = str(err.value)
    assert "spk-03 (test2, train)" in message and "\n" not in message


def test_unknown_speakers_are_never_validation_speakers_of_speaker_folds():
    rows = [r for r in partition_corpus(unknown_every=4).frame.to_dict("records")]
    for row in rows:
        row["split"] = None
    table = corpus(rows)
    protocol = resolve_protocol(table, ProtocolSettings(num_folds=3, n_val_speakers=2))
    names = protocol.speakers
    unknown = [n for n, name in names.items() if is_unknown_speaker(name)]
    assert len(unknown) == len(rows) // 4
    assert sorted(s for f in protocol.folds for s in f) == sorted(names)
    for val in protocol.validation:
        assert len(val) == 2 and not set(val) & set(unknown)
