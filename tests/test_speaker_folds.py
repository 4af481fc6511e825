import numpy as np
import pytest

from ser_ray.corpus import folds
from ser_ray.corpus.clips import (
    ClipTable,
    clip_frame,
    is_unknown_speaker,
    mark_unknown_speakers,
    speaker_numbers,
)
from ser_ray.corpus.folds import FoldError
from ser_ray.corpus.speaker_folds import (
    Partitions,
    check_disjoint,
    names_sides,
    partitions,
    predefined_folds,
    session_folds,
    speaker_genders,
    speaker_kfold,
    validation_speakers,
)


def corpus(speakers, **columns):
    """A clip frame with ``clips`` clips per speaker; ``columns`` maps a column to a dict
    speaker -> value (one value for all its clips)."""
    rows = []
    for speaker, clips in speakers.items():
        for i in range(clips):
            row = {"path": f"/c/{speaker}_{i}.wav", "speaker": speaker, "emotion": "happy"}
            row.update({name: values.get(speaker) for name, values in columns.items()})
            rows.append(row)
    return clip_frame(rows)


def random_corpus(rng):
    n = int(rng.integers(2, 41))
    speakers = {f"spk{i}": int(rng.integers(2, 81)) for i in range(n)}
    genders = {s: rng.choice(["male", "female", None]) for s in speakers}
    return corpus(speakers, gender=genders), genders


def other_speakers(all_folds, k):
    return [s for j, fold in enumerate(all_folds) if j != k for s in fold]


# --- speaker_kfold -----------------------------------------------------------------------


@pytest.mark.slow
def test_random_corpora_give_disjoint_balanced_deterministic_folds():
    for i in range(200):
        rng = np.random.default_rng(i)
        frame, genders = random_corpus(rng)
        speakers = sorted(genders)
        k = int(rng.integers(2, min(10, len(speakers)) + 1))
        got = speaker_kfold(frame, k, seed=i)

        assert len(got) == k and all(got)
        assert sorted(s for fold in got for s in fold) == speakers  # each in exactly one
        check_disjoint(got)
        for gender in ("male", "female", None):
            sizes = [sum(genders[s] == gender for s in fold) for fold in got]
            assert max(sizes) - min(sizes) <= 1, (i, gender, sizes)
        assert max(map(len, got)) - min(map(len, got)) <= 3
        assert speaker_kfold(frame, k, seed=i) == got
        shuffled = frame.sample(frac=1, random_state=i).reset_index(drop=True)
        assert speaker_kfold(shuffled, k, seed=i) == got  # row order does not matter

        order = speaker_numbers(speakers)
        validation = []
        for j, test in enumerate(got):
            train = other_speakers(got, j)
            n_val = int(rng.integers(0, len(train)))
            val = validation_speakers(train, speaker_genders(frame), order, n_val)
            assert len(val) == n_val and set(val) <= set(train) and not set(val) & set(test)
            validation.append(val)
        check_disjoint(got, validation)


def test_gender_balance_one_male_one_female_per_fold():
    speakers = {f"a{i}": 10 + i for i in range(10)}
    genders = {s: "male" if i < 5 else "female" for i, s in enumerate(speakers)}
    frame = corpus(speakers, gender=genders)
    for seed in range(5):
        got = speaker_kfold(frame, 5, seed)
        assert [sorted(genders[s] for s in fold) for fold in got] == [["female", "male"]] * 5


def test_clip_counts_stay_close_where_round_robin_does_not():
    clips = [80, 75, 70, 60, 50, 40, 30, 20, 10, 8, 6, 4]
    speakers = {f"s{i:02d}": n for i, n in enumerate(clips)}
    frame = corpus(speakers)
    names = sorted(speakers)
    naive = [[s for i, s in enumerate(names) if i % 3 == k] for k in range(3)]
    totals = lambda fs: [sum(speakers[s] for s in fold) for fold in fs]  # noqa: E731
    assert max(totals(naive)) - min(totals(naive)) == 54
    for seed in range(10):
        got = totals(speaker_kfold(frame, 3, seed))
        assert sum(got) == sum(clips) and max(got) - min(got) <= 6


def test_seed_changes_the_folds_and_names_sort_naturally():
    frame = corpus({str(i): 5 for i in range(1, 21)})
    first = speaker_kfold(frame, 4, seed=0)
    assert any(speaker_kfold(frame, 4, seed) != first for seed in range(1, 6))
    for fold in first:
        assert fold == sorted(fold, key=int)  # "2" before "10"


def test_kfold_errors_name_the_numbers_and_the_fix():
    frame = corpus({f"s{i}": 3 for i in range(10)})
    with pytest.raises(
        FoldError,
        match=r"10 speakers cannot form 12 speaker-disjoint folds; "
        r"lower --num-folds to at most 10",
    ):
        speaker_kfold(frame, 12)
    with pytest.raises(FoldError, match=r"at least 2 folds, not 1; set --num-folds to 2"):
        speaker_kfold(frame, 1)
    assert len(speaker_kfold(frame, 10)) == 10


def test_speaker_genders_unknown_when_missing_or_conflicting():
    frame = clip_frame(
        [
            {"path": "1", "speaker": "a", "emotion": "x", "gender": "male"},
            {"path": "2", "speaker": "a", "emotion": "x", "gender": None},
            {"path": "3", "speaker": "b", "emotion": "x", "gender": "male"},
            {"path": "4", "speaker": "b", "emotion": "x", "gender": "female"},
            {"path": "5", "speaker": "c", "emotion": "x", "gender": "other"},
        ]
    )
    assert speaker_genders(frame) == {"a": "male", "b": None, "c": None}


# --- session_folds -----------------------------------------------------------------------


def test_one_fold_per_session_in_natural_order():
    sessions = {"m1": "10", "f1": "10", "m2": "2", "f2": "2", "m3": "1", "f3": "1", "x": "2"}
    names, got = session_folds(corpus(dict.fromkeys(sessions, 2), session=sessions))
    assert names == ["1", "2", "10"]
    assert got == [["f3", "m3"], ["f2", "m2", "x"], ["f1", "m1"]]


def test_session_errors_name_speakers_and_clips():
    sessions = {"alice": "S1", "bob": "S2", "carol": "S2"}
    frame = corpus(dict.fromkeys(sessions, 2), session=sessions)
    frame.loc[frame["path"] == "/c/alice_1.wav", "session"] = "S2"
    with pytest.raises(
        FoldError, match=r"1 speakers are in more than one session: alice \(S1, S2\)"
    ):
        session_folds(frame)

    frame = corpus(dict.fromkeys(sessions, 2), session=sessions)
    frame.loc[frame["speaker"] == "bob", "session"] = None
    with pytest.raises(
        FoldError,
        match=r"2 of 6 clips have no session \(first: /c/bob_0.wav, "
        r"/c/bob_1.wav\); give every clip a session",
    ):
        session_folds(frame)

    one = corpus({"a": 2, "b": 2}, session={"a": "S1", "b": "S1"})
    with pytest.raises(FoldError, match=r"1 distinct session value \(S1\).*at least 2"):
        session_folds(one)


# --- predefined_folds --------------------------------------------------------------------


def test_predefined_folds_from_the_fold_column():
    fold_of = {"a": "fold10", "b": "fold2", "c": "fold1", "d": "fold2"}
    names, got = predefined_folds(corpus(dict.fromkeys(fold_of, 3), fold=fold_of))
    assert names == ["fold1", "fold2", "fold10"]
    assert got == [["c"], ["b", "d"], ["a"]]


def test_predefined_folds_fall_back_to_the_split_column():
    split = {"a": "g1", "b": "g2", "c": "g2"}
    names, got = predefined_folds(corpus(dict.fromkeys(split, 2), split=split))
    assert names == ["g1", "g2"] and got == [["a"], ["b", "c"]]
    # integer folds read as floats (a column with gaps) keep their names
    frame = corpus({"a": 2, "b": 2}, fold={"a": 1.0, "b": 2.0})
    assert predefined_folds(frame) == (["1", "2"], [["a"], ["b"]])


def test_predefined_fold_errors():
    fold_of = {"ann": "1", "ben": "2", "cat": "3"}
    frame = corpus(dict.fromkeys(fold_of, 2), fold=fold_of)
    frame.loc[frame["path"] == "/c/ben_0.wav", "fold"] = "3"
    frame.loc[frame["path"] == "/c/ann_0.wav", "fold"] = "2"
    with pytest.raises(
        FoldError,
        match=r"2 speakers are in more than one fold: ann \(1, 2\); "
        r"ben \(2, 3\)",
    ):
        predefined_folds(frame)

    frame = corpus(dict.fromkeys(fold_of, 2), fold=fold_of)
    frame.loc[frame["path"] == "/c/cat_1.wav", "fold"] = None
    with pytest.raises(FoldError, match=r"1 of 6 clips have no fold \(first: /c/cat_1.wav\)"):
        predefined_folds(frame)

    with pytest.raises(FoldError, match=r"no clip has a fold or a split"):
        predefined_folds(corpus({"ann": 2, "ben": 2}))


# --- partitions: a split column that names sides ------------------------------------------


def test_a_split_column_naming_sides_is_read_as_partitions_and_a_fold_column_as_folds():
    split = {"ann": "train", "ben": "Dev", "cat": "test2", "dan": "test1", "eve": "train"}
    frame = corpus(dict.fromkeys(split, 2), split=split)
    assert names_sides(frame)
    got = partitions(frame)
    assert got == Partitions(["ann", "eve"], ["ben"], ["test1", "test2"], [["dan"], ["cat"]])
    # "val" and "validation" name the dev side too; test sets take any other name
    for dev in ("val", "validation", "VALID"):
        assert partitions(corpus(dict.fromkeys(split, 2), split={**split, "ben": dev})).dev == [
            "ben"
        ]
    # a fold column keeps its k-fold meaning, whatever the split says
    assert not names_sides(corpus(dict.fromkeys(split, 2), split=split, fold=split))
    # only test-like splits: each a fold, as before
    assert not names_sides(corpus({"a": 2, "b": 2}, split={"a": "g1", "b": "g2"}))


def test_partition_errors_name_the_speaker_and_the_splits():
    split = {"ann": "train", "ben": "dev", "cat": "test1"}
    frame = corpus(dict.fromkeys(split, 2), split=split)
    frame.loc[frame["path"] == "/c/ann_1.wav", "split"] = "test1"
    with pytest.raises(FoldError) as err:
        partitions(frame)
    message = str(err.value)
    assert "1 speakers are in more than one split: ann (test1, train)" in message
    assert "\n" not in message

    for missing, given in (("train", {"ann": "dev"}), ("dev", {"ben": "train"})):
        with pytest.raises(FoldError, match=f"has no {missing} side"):
            partitions(corpus(dict.fromkeys(split, 2), split={**split, **given}))
    with pytest.raises(FoldError, match="has no test set"):
        partitions(corpus(dict.fromkeys(split, 2), split={**split, "cat": "dev"}))
    unlabelled = corpus(dict.fromkeys(split, 2), split=split)
    unlabelled.loc[0, "split"] = None
    with pytest.raises(FoldError, match="1 of 6 clips have no split"):
        partitions(unlabelled)


def test_unknown_speakers_are_one_speaker_each_and_never_validation_speakers():
    frame = corpus({"a": 2, "b": 2, "unknown": 3, "": 1}, gender={"a": "male"})
    table = mark_unknown_speakers(ClipTable(frame, [], "manifest"))
    names = table.frame["speaker"].tolist()
    assert names[:4] == ["a", "a", "b", "b"]
    assert names[4:] == ["?unknown-5", "?unknown-6", "?unknown-7", "?unknown-8"]
    assert all(is_unknown_speaker(n) for n in names[4:])
    assert speaker_numbers(names)["?unknown-5"] == 3  # after the known speakers
    other = mark_unknown_speakers(ClipTable(frame, [], "manifest"), unknown="b")
    assert other.frame["speaker"].tolist()[:4] == ["a", "a", "?unknown-3", "?unknown-4"]
    assert other.frame["speaker"].tolist()[4:7] == ["unknown"] * 3


# --- validation_speakers and check_disjoint ----------------------------------------------


#: RAVDESS's validation actors per fold with 4 validation actors (the rule the study always
#: used: from the end of the training actors, alternating male (odd) and female (even)).
RAVDESS_VALIDATION = {
    "contiguous": [[21, 22, 23, 24]] * 5 + [[17, 18, 19, 20]],
    "emobox": [
        [19, 22, 23, 24],
        [21, 22, 23, 24],
        [17, 21, 22, 24],
        [20, 21, 22, 23],
        [21, 22, 23, 24],
        [20, 21, 23, 24],
    ],
}


@pytest.mark.parametrize("scheme", ["contiguous", "emobox"])
def test_validation_speakers_keep_ravdess_validation_actors(scheme):
    genders = {str(a): "male" if a % 2 else "female" for a in range(1, 25)}
    order = {str(a): a for a in range(1, 25)}
    sets = folds.fold_sets(scheme)
    for fold, expected in enumerate(RAVDESS_VALIDATION[scheme]):
        train = [str(a) for k, actors in enumerate(sets) if k != fold for a in actors]
        got = validation_speakers(train, genders, order, 4)
        assert got == [str(a) for a in expected]
    train = [str(a) for a in range(5, 25)]  # contiguous fold 1, fewer or more of them
    picks = {1: [23], 2: [23, 24], 3: [21, 23, 24], 6: [19, 20, 21, 22, 23, 24]}
    for n_val, expected in picks.items():
        assert validation_speakers(train, genders, order, n_val) == [str(a) for a in expected]


def test_validation_unknown_gender_after_the_gendered_groups():
    order = {s: i for i, s in enumerate("abcdefg", 1)}
    genders = {"a": "male", "b": "female", "c": "male", "e": None}  # d, e, f, g unknown
    train = list("gfedcba")
    assert validation_speakers(train, genders, order, 3) == ["a", "b", "c"]
    assert validation_speakers(train, genders, order, 5) == ["a", "b", "c", "f", "g"]
    assert validation_speakers(train, {}, order, 2) == ["f", "g"]
    assert validation_speakers(train, {}, order, 0) == []
    with pytest.raises(
        FoldError,
        match=r"cannot hold out 7 validation speakers from 7 "
        r"training speakers; use 0 to 6",
    ):
        validation_speakers(train, genders, order, 7)


def test_check_disjoint_names_the_leak():
    check_disjoint([["a", "b"], ["c"]], [["c"], ["a"]])
    with pytest.raises(FoldError, match=r"speakers in more than one fold: b \(folds 1, 2\)"):
        check_disjoint([["a", "b"], ["b", "c"]])
    with pytest.raises(FoldError, match=r"fold 2's validation speakers \['c'\] are its test"):
        check_disjoint([["a", "b"], ["c"]], [["c"], ["c"]])
    with pytest.raises(FoldError, match=r"fold 1's validation speakers \['z'\] are not among"):
        check_disjoint([["a", "b"], ["c"]], [["z"], ["a"]])
    with pytest.raises(FoldError, match=r"1 validation sets for 2 folds"):
        check_disjoint([["a"], ["c"]], [["c"]])
