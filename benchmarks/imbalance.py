"""Measurement: class weighting on an imbalanced corpus (the figures behind ``--class-weight``).

Builds a clip manifest from a RAVDESS-layout demo corpus by keeping fewer clips of each class,
geometrically from the largest to the smallest (``--ratio 20``: 192 clips of calm down to 10
of surprised, ~19:1), drawn round-robin over the speakers, seeded; then runs the study
(``jobs/kfold.py``, six speaker folds) on it once per ``--class-weight`` setting and prints
each variant's figures side by side: macro-F1 on the test folds as they are (as imbalanced as
the training side), macro-F1 on a balanced test set (:func:`balanced_test_macro_f1`: the
setting of the Interspeech 2025 SER challenge, imbalanced training and a balanced test set),
UA (the same on either test set) and the recall of the smallest class. A setting whose run
folder holds a ``summary.json`` already is not run again (delete the folder to measure anew).

    python -m benchmarks.imbalance --corpus DIR --model ENCODER --out DIR

``--corpus``: a demo corpus folder (``write_demo_corpus``); ``--model``: the encoder of the
``wav2vec2+probe`` variant (e.g. the cached smoke demo encoder's ``model/`` folder). Not part of
``jobs/benchmark.py``: it measures accuracy, not speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from ser_ray.corpus import ravdess

#: Largest first: calm and the other 8-per-actor classes have 192 clips in the demo corpus,
#: neutral 96 (it lands third, where the target is below 96).
ORDER = ("calm", "happy", "neutral", "sad", "angry", "fearful", "disgust", "surprised")
#: (setting, variants): auto only changes what the SVMs do (the probe's auto is balanced here)
RUNS = (
    ("none", "svm,wav2vec2+probe"),
    ("balanced", "svm,wav2vec2+probe"),
    ("auto", "svm"),
)


def class_targets(largest: int, ratio: float) -> dict[str, int]:
    """Clips to keep per class: ``largest`` down to ``largest / ratio``, geometrically."""
    steps = len(ORDER) - 1
    return {e: round(largest * ratio ** (-k / steps)) for k, e in enumerate(ORDER)}


def write_imbalanced_manifest(corpus: Path, out_csv: Path, ratio: float, seed: int = 0) -> dict:
    """A manifest (path, speaker, emotion) of ``corpus`` with :func:`class_targets` clips
    per class, each class's clips taken round-robin over its speakers in a seeded order;
    returns the clips per class."""
    rows = []
    for wav in sorted(corpus.glob("Actor_*/*.wav")):
        name = ravdess.parse_name(wav)
        rows.append({"path": str(wav), "speaker": str(name.actor), "emotion": name.emotion})
    frame = pd.DataFrame(rows)
    rng = np.random.default_rng(seed)
    kept = []
    for emotion, target in class_targets(192, ratio).items():
        clips = frame[frame["emotion"] == emotion].sample(frac=1.0, random_state=rng)
        clips = clips.assign(turn=clips.groupby("speaker").cumcount())
        kept.append(clips.sort_values(["turn", "speaker"], kind="stable").head(target))
    manifest = pd.concat(kept).drop(columns="turn").sort_values("path")
    manifest.to_csv(out_csv, index=False)
    return manifest["emotion"].value_counts().to_dict()


def balanced_test_macro_f1(predictions: pd.DataFrame, classes: list[str]) -> list[float]:
    """Per fold: the macro-F1 the predictions would score on a test set with as many clips of
    every class, each class's clips predicted as its clips here were (every row of the
    confusion matrix scaled to one clip: precision then weighs each class alike)."""
    per_fold = []
    for _, fold in predictions.groupby("fold"):
        counts = confusion_matrix(fold["true_label"], fold["pred_label"], labels=classes)
        present = counts.sum(axis=1) > 0
        rates = (counts / np.maximum(counts.sum(axis=1, keepdims=True), 1))[present][:, present]
        recall = np.diag(rates)
        precision = recall / np.maximum(rates.sum(axis=0), 1e-12)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        per_fold.append(float(f1.mean()))
    return per_fold


def run_study(manifest: Path, model: str, setting: str, variants: str, out: Path) -> dict:
    """``jobs/kfold.py`` on ``manifest`` with ``--class-weight setting`` (unless ``out``
    holds its summary already); its summary."""
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    job = Path(__file__).resolve().parents[1] / "jobs" / "kfold.py"
    command = [
        sys.executable, str(job), "--manifest", str(manifest), "--num-folds", "6",
        "--variants", variants, "--model", model, "--class-weight", setting, "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ratio", type=float, default=20.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.out / "imbalanced.csv"
    counts = write_imbalanced_manifest(args.corpus, manifest, args.ratio)
    print(f"clips per class: {counts}", flush=True)
    smallest = ORDER[-1]
    lines = [
        "| --class-weight | variant | macro-F1 %, test folds | macro-F1 %, balanced test "
        f"| UA % | recall of {smallest} % |",
        "|---|---|---|---|---|---|",
    ]
    for setting, variants in RUNS:
        doc = run_study(manifest, args.model, setting, variants, args.out / setting)
        predictions = pd.read_csv(args.out / setting / "predictions.csv")
        for variant in doc["models_run"]:
            mean, std = doc["mean"][variant], doc["std"][variant]
            ours = predictions[predictions["model"] == variant]
            balanced = 100 * np.array(balanced_test_macro_f1(ours, doc["classes"]))
            lines.append(
                f"| {setting} | {variant} | {_pm(mean, std, 'macro_f1')} | "
                f"{balanced.mean():.1f} ± {balanced.std(ddof=1):.1f} | {_pm(mean, std, 'uar')} | "
                f"{100 * doc['per_class_recall'][variant][smallest]:.1f} |"
            )
    print("\n".join(lines))


def _pm(mean: dict, std: dict, metric: str) -> str:
    return f"{100 * mean[metric]:.1f} ± {100 * std[metric]:.1f}"


if __name__ == "__main__":
    main()
