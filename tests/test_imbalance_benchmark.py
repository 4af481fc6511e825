"""benchmarks/imbalance.py's arithmetic: the imbalanced corpus it builds (from a demo folder or
a manifest), the balanced-test macro-F1, the per-fold scores and the paired differences that
go into docs/results.md."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.imbalance import (  # noqa: E402
    ORDER,
    balanced_test_macro_f1,
    class_targets,
    corpus_clips,
    fold_scores,
    grid_class_weights,
    manifest_clips,
    paired_difference,
    tables,
    write_imbalanced_manifest,
)
from ser_ray.common.errors import SettingsError  # noqa: E402


def _base_clips(speakers: int = 4, per_class: int = 8) -> pd.DataFrame:
    """``per_class`` clips of every class, spread evenly over ``speakers``."""
    rows = [
        {"path": f"spk{n % speakers}/{e}_{n}.wav", "speaker": f"spk{n % speakers}", "emotion": e}
        for e in ORDER
        for n in range(per_class)
    ]
    return pd.DataFrame(rows)


def test_class_targets_fall_geometrically_from_the_largest_to_largest_over_ratio():
    targets = class_targets(192, 20)
    assert targets["calm"] == 192 and targets["surprised"] == 10
    assert list(targets.values()) == sorted(targets.values(), reverse=True)
    big = class_targets(1000, 20)
    assert (big["calm"], big["neutral"], big["surprised"]) == (1000, 425, 50)


def test_the_imbalanced_manifest_keeps_the_targets_round_robin_over_speakers(tmp_path):
    out = tmp_path / "imbalanced.csv"
    counts = write_imbalanced_manifest(_base_clips(), out, largest=8, ratio=4)
    assert counts == class_targets(8, 4)
    written = pd.read_csv(out)
    assert list(written.columns) == ["path", "speaker", "emotion"]
    assert written["emotion"].value_counts().to_dict() == counts
    # the smallest class (2 clips) and a middle one (4 clips) each on as many speakers as clips
    for emotion in ("surprised", "angry"):
        of = written[written["emotion"] == emotion]
        assert of["speaker"].nunique() == min(len(of), 4)
    # speakers drawn anew per class: the small classes together cover every speaker, where
    # taking speakers in number order would put them all on the first ones
    rows = [
        {"path": f"{e}_{n}.wav", "speaker": f"spk{n:02d}", "emotion": e}
        for e in ORDER
        for n in range(12)
    ]
    wide = tmp_path / "wide.csv"
    targets = write_imbalanced_manifest(pd.DataFrame(rows), wide, largest=12, ratio=4)
    small = pd.read_csv(wide).pipe(lambda m: m[m["emotion"].map(targets) < 12])
    assert small["speaker"].nunique() == 12
    assert max(targets.values()) == 12 and sorted(targets.values())[-2] == 10
    again = tmp_path / "again.csv"
    write_imbalanced_manifest(_base_clips(), again, largest=8, ratio=4)
    assert again.read_text() == out.read_text()  # seeded


def test_a_base_corpus_too_small_for_the_targets_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="fewer than the 9"):
        write_imbalanced_manifest(_base_clips(), tmp_path / "m.csv", largest=9, ratio=4)


def test_manifest_clips_resolve_relative_paths_against_the_manifest_folder(tmp_path):
    base = tmp_path / "corpus"
    base.mkdir()
    frame = _base_clips(per_class=1).assign(gender="male")
    frame.loc[0, "path"] = "/abs/clip.wav"
    frame.to_csv(base / "manifest.csv", index=False)
    clips = manifest_clips(base / "manifest.csv")
    assert list(clips.columns) == ["path", "speaker", "emotion"]
    assert clips["path"].iloc[0] == "/abs/clip.wav"
    assert clips["path"].iloc[1] == str(base / frame["path"].iloc[1])


def test_corpus_clips_read_a_ravdess_folder(tmp_path):
    actor = tmp_path / "Actor_03"
    actor.mkdir()
    (actor / "03-01-08-02-01-01-03.wav").write_bytes(b"")
    (actor / "03-01-01-01-01-01-03.wav").write_bytes(b"")
    clips = corpus_clips(tmp_path)
    assert clips["emotion"].tolist() == ["neutral", "surprised"]
    assert clips["speaker"].tolist() == ["3", "3"]


def test_balanced_test_macro_f1_scales_every_class_to_one_clip():
    # 90 clips of a and 10 of b: b's 10 all right, 9 of a's 90 taken for b
    true = ["a"] * 90 + ["b"] * 10
    pred = ["a"] * 81 + ["b"] * 9 + ["b"] * 10
    frame = pd.DataFrame({"fold": 1, "true_label": true, "pred_label": pred})
    # balanced test: recall a 0.9, b 1.0; precision a 1.0, b 1 / 1.1
    f1_a, f1_b = 2 * 0.9 / 1.9, 2 * (1 / 1.1) / (1 / 1.1 + 1)
    assert balanced_test_macro_f1(frame, ["a", "b"]) == [pytest.approx((f1_a + f1_b) / 2)]


def test_paired_difference_matches_folds_and_counts_those_improved():
    weighted = pd.Series({1: 50.0, 2: 60.0, 3: 40.0})
    unweighted = pd.Series({3: 42.0, 1: 45.0, 2: 58.0})  # another order: matched by fold
    # differences +5, +2, -2: mean 1.667, std 3.512
    assert paired_difference(weighted, unweighted) == "+1.7 ± 3.5 (2/3 up)"


def test_grid_class_weights_counts_the_choice_per_fold():
    rows = [{"svm_params": {"class_weight": w}} for w in ("balanced", None, "balanced")]
    assert grid_class_weights(rows) == "balanced ×2, None ×1"


def _study(out: Path, shift: float) -> dict:
    """A two-fold study folder of two classes (calm, surprised): summary.json, predictions.csv,
    svm_folds.json; ``svm``'s macro-F1 and UA are ``0.5 + shift`` in fold 1, ``0.6 + shift``
    in fold 2."""
    out.mkdir()
    folds = [
        {"fold": k, "svm": {"macro_f1": base + shift, "uar": base + shift}}
        for k, base in ((1, 0.5), (2, 0.6))
    ]
    doc = {"folds": folds, "classes": ["calm", "surprised"], "models_run": ["svm"],
           "per_class_recall": {"svm": {"calm": 1.0, "surprised": 0.5}}}  # fmt: skip
    rows = [("calm", "calm"), ("surprised", "surprised"), ("surprised", "calm"), ("calm", "calm")]
    pd.DataFrame(
        [{"fold": k, "model": "svm", "true_label": t, "pred_label": p} for k in (1, 2)
         for t, p in rows]
    ).to_csv(out / "predictions.csv", index=False)  # fmt: skip
    (out / "svm_folds.json").write_text(json.dumps([{"svm_params": {"class_weight": None}}] * 2))
    return doc


def test_fold_scores_and_tables_put_settings_side_by_side_with_paired_differences(tmp_path):
    none = _study(tmp_path / "none", 0.0)
    weighted = _study(tmp_path / "balanced", 0.1)
    frame = fold_scores(none, pd.read_csv(tmp_path / "none" / "predictions.csv"), "svm")
    assert frame.index.tolist() == [1, 2]
    assert frame["macro_f1"].tolist() == pytest.approx([50.0, 60.0])
    # recall calm 1.0, surprised 0.5 -> precision 1 / 1.5 and 1: F1 0.8 and 2/3
    assert frame["balanced_macro_f1"].tolist() == pytest.approx([100 * (0.8 + 2 / 3) / 2] * 2)
    text = tables(
        {"none": (none, tmp_path / "none"), "balanced": (weighted, tmp_path / "balanced")}
    )
    assert "| none | svm | 55.0 ± 7.1 | 73.3 ± 0.0 | 55.0 ± 7.1 | 100 / 50 | None ×2 |" in text
    assert "| balanced - none | svm | +10.0 ± 0.0 (2/2 up) | +0.0 ± 0.0 (0/2 up) |" in text
