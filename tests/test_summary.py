"""Summary tables and plots from known per-fold numbers and synthetic out-of-fold predictions."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest

from ser_ray.corpus.ravdess import class_names
from ser_ray.study import summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = class_names(merge_calm=False)
SVM_UAR = [0.30, 0.40, 0.35, 0.45, 0.25, 0.33]
W2V_UAR = [0.50, 0.62, 0.48, 0.70, 0.55, 0.57]


def fold_results(models=("svm", "wav2vec2")) -> list[dict]:
    out = []
    for i in range(6):
        row = {"fold": i + 1, "test_actors": list(range(4 * i + 1, 4 * i + 5)), "n_test": 8}
        if "svm" in models:
            row["svm"] = {"accuracy": SVM_UAR[i] + 0.02, "uar": SVM_UAR[i], "macro_f1": 0.3}
        if "wav2vec2" in models:
            row["wav2vec2"] = {
                "accuracy": W2V_UAR[i] + 0.01,
                "uar": W2V_UAR[i],
                "macro_f1": 0.5,
                "best_epoch": i % 3 + 1,
            }
        out.append(row)
    return out


def predictions(models=("svm", "wav2vec2")) -> pd.DataFrame:
    """8 clips per fold (one per emotion); svm right on even clips, wav2vec2 always right."""
    rows = []
    for fold in range(1, 7):
        for k, emotion in enumerate(CLASSES):
            actor = 4 * (fold - 1) + 1 + k % 4
            path = f"/data/Actor_{actor:02d}/03-01-{k + 1:02d}-01-01-01-{actor:02d}.wav"
            for model in models:
                pred = emotion if model == "wav2vec2" or k % 2 == 0 else CLASSES[0]
                probs = {f"prob_{c}": float(c == pred) for c in CLASSES}
                rows.append(
                    {
                        "path": path,
                        "actor": actor,
                        "fold": fold,
                        "true_label": emotion,
                        "pred_label": pred,
                        "model": model,
                        **probs,
                    }
                )
    return pd.DataFrame(rows)


RUN = summary.RunInfo(
    models={"wav2vec2": "demo"}, merge_calm=False, fold_scheme="contiguous", config={"epochs": 3}
)


def test_mean_and_sample_std_on_known_numbers():
    mean, std = summary.fold_mean_std(fold_results())
    assert mean["svm"]["uar"] == pytest.approx(np.mean(SVM_UAR))
    assert std["svm"]["uar"] == pytest.approx(np.std(SVM_UAR, ddof=1))
    assert std["svm"]["uar"] == pytest.approx(0.071181, abs=1e-6)  # by hand: sqrt(0.025333 / 5)
    assert mean["wav2vec2"]["best_epoch"] == pytest.approx(2.0)
    assert std["wav2vec2"]["best_epoch"] == pytest.approx(np.std([1, 2, 3, 1, 2, 3], ddof=1))


def test_paired_difference_is_per_fold_wav2vec2_minus_svm():
    diff = summary.paired_difference(fold_results(), "wav2vec2", "svm")
    expected = np.subtract(W2V_UAR, SVM_UAR)
    assert [d["difference"] for d in diff["per_fold"]] == pytest.approx(expected)
    assert diff["mean"] == pytest.approx(expected.mean())
    assert diff["std"] == pytest.approx(np.std(expected, ddof=1))
    assert summary.paired_difference(fold_results(("svm",)), "wav2vec2", "svm") is None


def test_single_fold_std_is_nan():
    mean, std = summary.fold_mean_std(fold_results()[:1])
    assert mean["svm"]["uar"] == pytest.approx(SVM_UAR[0])
    assert math.isnan(std["svm"]["uar"])


def test_prediction_stats_confusion_and_recall():
    stats = summary.prediction_stats(predictions(), CLASSES)
    svm_cm = np.array(stats["svm"]["confusion"])
    assert svm_cm.sum() == 48 and svm_cm.shape == (8, 8)
    # odd-index emotions (calm, sad, fearful, surprised) all predicted as neutral
    assert svm_cm[1, 0] == 6 and svm_cm[1, 1] == 0 and svm_cm[0, 0] == 6
    assert stats["svm"]["per_class_recall"]["calm"] == 0.0
    assert stats["svm"]["per_class_recall"]["happy"] == 1.0
    assert stats["svm"]["pooled"]["uar"] == pytest.approx(0.5)
    assert np.array_equal(stats["wav2vec2"]["confusion"], 6 * np.eye(8, dtype=int))


def test_write_summary_files(tmp_path):
    histories = {
        f: [{"epoch": e, "train/loss": 1.0 / e, "val/uar": 0.2 * e} for e in (1, 2, 3)]
        for f in range(1, 7)
    }
    lr = [(s, 1e-4 * min(1.0, (s + 1) / 10)) for s in range(100)]
    result = summary.write_summary(
        tmp_path, fold_results(), predictions(), CLASSES, RUN,
        histories={"wav2vec2": histories}, lr_schedules={"wav2vec2": lr},
    )  # fmt: skip

    doc = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "folds",
        "mean",
        "std",
        "models",
        "merge_calm",
        "fold_scheme",
        "classes",
        "per_class_recall",
        "confusion",
        "paired_differences",
    ):
        assert key in doc
    assert doc["models"] == {"wav2vec2": "demo"} and doc["merge_calm"] is False
    assert doc["folds"][0] == {
        "fold": 1,
        "test_actors": [1, 2, 3, 4],
        "n_test": 8,
        "svm": {"uar": 0.30, "accuracy": 0.32, "macro_f1": 0.3},
        "wav2vec2": {"uar": 0.50, "accuracy": 0.51, "macro_f1": 0.5, "best_epoch": 1},
    }
    assert doc["mean"]["wav2vec2"]["uar"] == pytest.approx(np.mean(W2V_UAR))
    assert doc["std"]["svm"]["uar"] == pytest.approx(np.std(SVM_UAR, ddof=1))
    assert "ddof=1" in doc["std_kind"]
    assert doc["confusion"]["svm"][1][0] == 6

    with open(tmp_path / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["fold"] for r in rows] == ["1", "2", "3", "4", "5", "6", "mean", "std"]
    assert rows[0]["test_actors"] == "1 2 3 4"
    assert float(rows[3]["svm_uar"]) == pytest.approx(0.45)
    assert float(rows[6]["wav2vec2_uar"]) == pytest.approx(np.mean(W2V_UAR))
    assert float(rows[0]["uar_wav2vec2_minus_svm"]) == pytest.approx(0.20)

    md = (tmp_path / "summary.md").read_text()
    assert "| 1 | 1,2,3,4 | 8 | 30.0 | 32.0 | 30.0 | 50.0 | 51.0 | 50.0 | 1 |" in md
    assert "| mean ± std |  | 48 | 34.7 ± 7.1 |" in md
    assert "wav2vec2 model: demo" in md
    assert "calm merged into neutral: no" in md
    assert "ddof=1" in md
    d = np.subtract(W2V_UAR, SVM_UAR)
    assert f"- wav2vec2 − svm UA: +{100 * d.mean():.1f} ± {100 * d.std(ddof=1):.1f}" in md
    assert "| calm | 0.0 | 100.0 |" in md

    names = {
        "confusion_svm.png",
        "confusion_wav2vec2.png",
        "folds_uar.png",
        "learning_curves_wav2vec2.png",
        "lr_schedule_wav2vec2.png",
    }
    assert set(doc["plots"]) == names
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert name in result["files"]


def test_format_table_lines():
    doc = summary.build_summary(fold_results(), predictions(), CLASSES, RUN)
    lines = summary.format_table(doc).splitlines()
    assert len(lines) == 2 + 6 + 1
    assert lines[0].startswith("| fold | test actors | n | SVM UA % | SVM acc % | SVM F1 %")
    assert lines[0].endswith("| best epoch |")
    assert lines[-1].endswith("| 2.0 ± 0.9 |")


def test_svm_only_summary(tmp_path):
    run = {"merge_calm": True, "fold_scheme": "emobox", "config": {}}
    seven = class_names(merge_calm=True)
    preds = predictions(("svm",))
    preds["true_label"] = preds["true_label"].replace("calm", "neutral")
    preds["pred_label"] = preds["pred_label"].replace("calm", "neutral")
    preds = preds.drop(columns=["prob_calm"])
    summary.write_summary(tmp_path, fold_results(("svm",)), preds, seven, run)
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert list(doc["mean"]) == ["svm"] and doc["paired_differences"] == []
    assert doc["models_run"] == ["svm"] and doc["merge_calm"] is True
    assert doc["classes"] == seven and np.array(doc["confusion"]["svm"]).shape == (7, 7)
    md = (tmp_path / "summary.md").read_text()
    assert " model: " not in md and "calm merged into neutral: yes" in md
    assert "wav2vec2" not in md.split("## Per fold")[1].splitlines()[2]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["confusion_svm.png", "folds_uar.png"]


def test_coverage_duplicate_and_missing_paths_are_named():
    preds = predictions()
    dup_path = preds.iloc[0]["path"]
    duplicated = pd.concat([preds, preds.iloc[[0]]], ignore_index=True)
    with pytest.raises(summary.CoverageError, match="more than once") as err:
        summary.check_coverage(duplicated)
    assert dup_path in str(err.value) and "'svm'" in str(err.value)

    missing_path = preds[preds["model"] == "wav2vec2"].iloc[3]["path"]
    dropped = preds.drop(index=preds[(preds["model"] == "wav2vec2")].index[3])
    with pytest.raises(summary.CoverageError, match="missing") as err:
        summary.check_coverage(dropped)
    assert missing_path in str(err.value) and "'wav2vec2'" in str(err.value)

    with pytest.raises(summary.CoverageError, match="unexpected"):
        summary.check_coverage(preds, expected_paths=preds["path"].unique()[:-1])
    summary.check_coverage(preds, expected_paths=preds["path"].unique())  # exact cover: fine
    with pytest.raises(summary.CoverageError):
        summary.build_summary(fold_results(), duplicated, CLASSES, RUN)


def test_three_variants_get_column_groups_and_differences_against_the_first(tmp_path):
    spk_uar = [0.80, 0.85, 0.90, 0.75, 0.70, 0.88]
    folds = fold_results()
    for row, uar in zip(folds, spk_uar, strict=True):  # put svm+spknorm between the two
        row["svm+spknorm"] = {"accuracy": uar + 0.01, "uar": uar, "macro_f1": uar - 0.01}
        row["wav2vec2"] = row.pop("wav2vec2")
    preds = predictions(("svm", "svm+spknorm", "wav2vec2"))
    about = {"svm+spknorm": {"family": "svm", "features": "mfcc", "normalisation": "per-actor z"}}
    run = dataclasses.replace(RUN, variants=about)
    summary.write_summary(tmp_path, folds, preds, CLASSES, run)

    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["models_run"] == ["svm", "svm+spknorm", "wav2vec2"]
    assert doc["mean"]["svm+spknorm"]["uar"] == pytest.approx(np.mean(spk_uar))
    assert doc["variants"]["svm+spknorm"]["normalisation"] == "per-actor z"
    pairs = {(d["minuend"], d["subtrahend"], d["metric"]): d for d in doc["paired_differences"]}
    assert set(pairs) == {
        (v, "svm", k) for v in ("svm+spknorm", "wav2vec2") for k in ("uar", "accuracy", "macro_f1")
    }
    spk_minus_svm = np.subtract(spk_uar, SVM_UAR)
    got = [d["difference"] for d in pairs[("svm+spknorm", "svm", "uar")]["per_fold"]]
    assert got == pytest.approx(spk_minus_svm)
    assert pairs[("svm+spknorm", "svm", "uar")]["std"] == pytest.approx(
        np.std(spk_minus_svm, ddof=1)
    )

    with open(tmp_path / "summary.csv") as fh:
        header = next(csv.reader(fh))
    assert header[3:12] == [f"{v}_{k}" for v in ("svm", "svm+spknorm") for k in summary.METRICS] + [
        f"wav2vec2_{k}" for k in summary.METRICS
    ]
    assert "uar_svm+spknorm_minus_svm" in header and "uar_wav2vec2_minus_svm" in header

    md = (tmp_path / "summary.md").read_text()
    table_header = md.split("## Per fold")[1].splitlines()[2]
    assert "| SVM UA % | SVM acc % | SVM F1 % | svm+spknorm UA % |" in table_header
    assert f"- svm+spknorm − svm UA: +{100 * spk_minus_svm.mean():.1f}" in md
    assert "- svm+spknorm: mfcc features, normalisation: per-actor z" in md
    assert (tmp_path / "confusion_svm+spknorm.png").read_bytes().startswith(PNG_MAGIC)


def test_partitions_rows_are_named_test_sets_with_unknown_speakers_counted(tmp_path):
    """A corpus's own partitions: one row per test set named after it (json, md, csv), its
    unknown-speaker clips counted, mean and std said to be over test sets."""
    rows = []
    for k, name in enumerate(("test1", "test2"), 1):
        speakers = [f"spk{k}a", f"spk{k}b", f"?unknown-{k}1", f"?unknown-{k}2"]
        rows.append(
            {"fold": k, "name": name, "test_actors": [10 * k + i for i in range(4)],
             "test_speakers": speakers, "n_test": 8,
             "svm": {"accuracy": 0.5 + k / 10, "uar": 0.4 + k / 10, "macro_f1": 0.3}}
        )  # fmt: skip
    preds = predictions(("svm",))
    info = summary.RunInfo(models={}, fold_scheme="partitions")
    got = summary.write_summary(tmp_path, rows, preds, CLASSES, info)
    assert [(f["fold"], f["name"], f["n_test"]) for f in got["folds"]] == [
        (1, "test1", 8),
        (2, "test2", 8),
    ]
    assert got["std_kind"] == summary.PARTITIONS_NOTE
    md = (tmp_path / "summary.md").read_text()
    assert "| test set | test speakers | n |" in md
    assert "| test1 | spk1a,spk1b + 2 clips of unknown speakers | 8 | 50.0 |" in md
    assert "| mean ± std over test sets |" in md and "fold scheme: partitions" in md
    with open(tmp_path / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table[:2]] == ["test1", "test2"]
