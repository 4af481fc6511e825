import pytest

from ser_ray.corpus import folds
from ser_ray.corpus.folds import FoldError
from ser_ray.corpus.protocol import ravdess_protocol


@pytest.mark.parametrize("scheme", ["contiguous", "emobox"])
def test_six_disjoint_folds_cover_24_actors(scheme):
    sets = folds.fold_sets(scheme)
    assert len(sets) == 6 and all(len(s) == 4 for s in sets)
    flat = [a for s in sets for a in s]
    assert sorted(flat) == list(range(1, 25))
    protocol = ravdess_protocol(scheme)
    for k in range(1, 7):
        test, train = protocol.test_and_train(k)
        assert test == sets[k - 1] and not set(test) & set(train) and len(train) == 20
        folds.check_no_leakage(train, test)


def test_contiguous_blocks_are_gender_balanced():
    assert folds.fold_sets()[1] == [5, 6, 7, 8]
    for s in folds.fold_sets("contiguous"):
        assert sum(a % 2 for a in s) == 2  # two male (odd), two female (even)


def test_emobox_sets():
    assert folds.fold_sets("emobox")[5] == [6, 13, 17, 22]
    assert ravdess_protocol("emobox").fold_of_speaker()[21] == 1


def test_missing_actors_are_named():
    with pytest.raises(FoldError, match=r"actors missing: \[3, 17\]"):
        folds.check_actors([a for a in range(1, 25) if a not in (3, 17)])
    folds.check_actors(range(1, 25))


def test_leakage_is_caught():
    with pytest.raises(FoldError, match=r"speakers \[4\] are in both"):
        folds.check_no_leakage([1, 2, 4], [4, 5])


def test_unknown_scheme_and_fold():
    with pytest.raises(FoldError, match="unknown fold scheme 'random'"):
        folds.fold_sets("random")
    with pytest.raises(FoldError, match="fold 7 does not exist"):
        ravdess_protocol().test_and_train(7)


def test_validation_actors_from_training_side():
    test, fit, val = ravdess_protocol().split(6)
    assert val == [17, 18, 19, 20] and not set(val) & set(fit + test)
    assert sum(a % 2 for a in val) == 2 and len(fit) == 16
    assert ravdess_protocol().split(6) == (test, fit, val)  # deterministic
