"""Measurement: class weighting on an imbalanced corpus (the figures behind ``--class-weight``).

Builds a clip manifest from a base corpus (``--corpus``: a RAVDESS-layout demo corpus folder;
``--manifest``: a clip manifest such as the scale benchmark's, ``benchmarks/scale_corpus.py``)
by keeping fewer clips of each class, geometrically from ``--largest`` clips of the largest
class down to ``--largest / --ratio`` of the smallest (e.g. ``--largest 1000 --ratio 20``:
1000 clips of calm down to 50 of surprised), each class's clips drawn round-robin over the
speakers, seeded. Then it runs the study (``jobs/kfold.py``, six speaker folds) on it once per
``--class-weight`` setting, one setting after the other, and prints each variant's figures side
by side: macro-F1 on the test folds as they are (as imbalanced as the training side), macro-F1
on a balanced test set (:func:`balanced_test_macro_f1`: the setting of the Interspeech 2025 SER
challenge, imbalanced training and a balanced test set), UA (the same on either test set), the
recall of every class, the SVM grid's ``class_weight`` per fold, and the paired per-fold
differences weighted - unweighted (mean ± std over folds, folds improved): settings differ by
less than the folds differ from each other, so only the paired difference can show a gain. A
setting whose run folder holds a ``summary.json`` already is not run again (delete the folder
to measure anew).

    python -m benchmarks.imbalance --manifest M.csv --largest 1000 --model ENCODER --out DIR
    python -m benchmarks.imbalance --corpus DIR --model ENCODER --out DIR

``--model``: the encoder of the ``wav2vec2+probe`` variant (e.g. the cached smoke demo
encoder's ``model/`` folder). Not part of ``jobs/benchmark.py``: it measures accuracy, not speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from ser_ray.common.errors import SettingsError
from ser_ray.corpus import ravdess

#: Largest first: in the demo and scale corpora neutral has half the clips of every other
#: class, so it lands third, where the target is at most half the largest.
ORDER = ("calm", "happy", "neutral", "sad", "angry", "fearful", "disgust", "surprised")
#: (setting, variants): auto only changes what the SVMs do (the probe's auto is balanced here)
RUNS = (
    ("none", "svm,wav2vec2+probe"),
    ("balanced", "svm,wav2vec2+probe"),
    ("auto", "svm"),
)
#: The unweighted setting every other one is compared with, fold by fold.
UNWEIGHTED = "none"
#: (column, per-fold metric) of the tables: test folds' macro-F1, balanced test's, UA.
METRICS = (
    ("macro-F1 %, test folds", "macro_f1"),
    ("macro-F1 %, balanced test", "balanced_macro_f1"),
    ("UA %", "uar"),
)


def class_targets(largest: int, ratio: float) -> dict[str, int]:
    """Clips to keep per class: ``largest`` down to ``largest / ratio``, geometrically."""
    steps = len(ORDER) - 1
    return {e: round(largest * ratio ** (-k / steps)) for k, e in enumerate(ORDER)}


def corpus_clips(corpus: Path) -> pd.DataFrame:
    """path, speaker, emotion of every clip of a RAVDESS-layout folder (``Actor_XX/*.wav``)."""
    rows = []
    for wav in sorted(corpus.glob("Actor_*/*.wav")):
        name = ravdess.parse_name(wav)
        rows.append({"path": str(wav), "speaker": str(name.actor), "emotion": name.emotion})
    return pd.DataFrame(rows, columns=["path", "speaker", "emotion"])


def manifest_clips(manifest: Path) -> pd.DataFrame:
    """path, speaker, emotion of a clip manifest (CSV), paths made absolute (a manifest's
    relative paths are relative to its folder; the imbalanced manifest lives elsewhere)."""
    frame = pd.read_csv(manifest, dtype={"speaker": str})
    paths = [p if Path(p).is_absolute() else str(manifest.parent / p) for p in frame["path"]]
    return frame.assign(path=paths)[["path", "speaker", "emotion"]]


def write_imbalanced_manifest(
    clips: pd.DataFrame, out_csv: Path, largest: int, ratio: float, seed: int = 0
) -> dict[str, int]:
    """A manifest (path, speaker, emotion) of ``clips`` with :func:`class_targets` clips
    per class, each class's clips taken round-robin over its speakers in a seeded order, drawn
    anew per class: a class with fewer clips than speakers lands on as many speakers as it has
    clips, and on other speakers than the next class (in speaker-number order every small
    class would sit on the first speakers, and the validation speakers, the last numbers of a
    fold's training side, would hold none of them); returns the clips per class. A class
    with fewer clips than its target is refused: the ratio would not be the one asked for."""
    rng = np.random.default_rng(seed)
    kept = []
    for emotion, target in class_targets(largest, ratio).items():
        clips_of = clips[clips["emotion"] == emotion]
        if len(clips_of) < target:
            raise SettingsError(
                f"the base corpus has {len(clips_of)} clips of {emotion}, fewer than the "
                f"{target} that --largest {largest} --ratio {ratio:g} need; lower --largest"
            )
        shuffled = clips_of.sample(frac=1.0, random_state=rng)
        speakers = rng.permutation(sorted(shuffled["speaker"].unique()))
        shuffled = shuffled.assign(
            turn=shuffled.groupby("speaker").cumcount(),
            rank=shuffled["speaker"].map({s: k for k, s in enumerate(speakers)}),
        )
        kept.append(shuffled.sort_values(["turn", "rank"], kind="stable").head(target))
    manifest = pd.concat(kept).drop(columns=["turn", "rank"]).sort_values("path")
    manifest.to_csv(out_csv, index=False)
    return {e: int(n) for e, n in manifest["emotion"].value_counts().items()}


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


def fold_scores(doc: dict, predictions: pd.DataFrame, variant: str) -> pd.DataFrame:
    """One row per fold (index: fold) of ``variant`` in a study's ``summary.json`` (``doc``)
    and its ``predictions.csv``: macro_f1, balanced_macro_f1, uar, in percent."""
    folds = [f["fold"] for f in doc["folds"]]
    ours = predictions[predictions["model"] == variant]
    per_fold = balanced_test_macro_f1(ours, doc["classes"])  # in groupby's order: sorted folds
    balanced = dict(zip(sorted(ours["fold"].unique()), per_fold, strict=True))
    rows = {
        f["fold"]: {
            "macro_f1": 100 * f[variant]["macro_f1"],
            "balanced_macro_f1": 100 * balanced[f["fold"]],
            "uar": 100 * f[variant]["uar"],
        }
        for f in doc["folds"]
    }
    return pd.DataFrame.from_dict(rows, orient="index").loc[folds]


def paired_difference(weighted: pd.Series, unweighted: pd.Series) -> str:
    """``weighted - unweighted`` per fold (the same folds, matched by index) as
    ``mean ± std (k/n up)``: k folds where weighting scored higher."""
    diff = (weighted - unweighted.loc[weighted.index]).to_numpy()
    return f"{diff.mean():+.1f} ± {diff.std(ddof=1):.1f} ({int((diff > 0).sum())}/{len(diff)} up)"


def grid_class_weights(fold_rows: list[dict]) -> str:
    """The SVM grid's chosen ``class_weight`` over the folds of ``<variant>_folds.json``,
    e.g. ``balanced ×4, None ×2``."""
    chosen = Counter(str(row["svm_params"].get("class_weight")) for row in fold_rows)
    return ", ".join(f"{weight} ×{n}" for weight, n in chosen.most_common())


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


def setting_rows(setting: str, doc: dict, out: Path) -> tuple[list[str], dict]:
    """The side-by-side table's rows of one setting's run (folder ``out``), and its per-fold
    scores per variant (for the paired differences)."""
    predictions = pd.read_csv(out / "predictions.csv")
    lines, scores = [], {}
    for variant in doc["models_run"]:
        scores[variant] = frame = fold_scores(doc, predictions, variant)
        recall = doc["per_class_recall"][variant]
        cells = [f"{frame[m].mean():.1f} ± {frame[m].std(ddof=1):.1f}" for _, m in METRICS]
        cells.append(" / ".join(f"{100 * recall[e]:.0f}" for e in ORDER if e in recall))
        folds_json = out / f"{variant}_folds.json"
        picked = ""
        if folds_json.exists():  # an SVM variant: what its grid chose per fold
            picked = grid_class_weights(json.loads(folds_json.read_text()))
        lines.append(f"| {setting} | {variant} | {' | '.join(cells)} | {picked} |")
    return lines, scores


def tables(runs: dict[str, tuple[dict, Path]]) -> str:
    """The side-by-side table of every setting and variant, then the paired per-fold
    differences of each weighted setting against :data:`UNWEIGHTED`."""
    header = " | ".join(name for name, _ in METRICS)
    lines = [
        f"| --class-weight | variant | {header} | recall % per class ({', '.join(ORDER)}) "
        "| SVM grid's class_weight |",
        "|---|---|---|---|---|---|---|",
    ]
    scores = {}
    for setting, (doc, out) in runs.items():
        rows, scores[setting] = setting_rows(setting, doc, out)
        lines.extend(rows)
    lines += ["", f"Paired per-fold differences, weighted - {UNWEIGHTED} (percentage points):", ""]
    lines += [f"| setting | variant | {header} |", "|---|---|---|---|---|"]
    for setting, by_variant in scores.items():
        for variant, frame in by_variant.items():
            if setting == UNWEIGHTED or variant not in scores[UNWEIGHTED]:
                continue
            base = scores[UNWEIGHTED][variant]
            cells = [paired_difference(frame[m], base[m]) for _, m in METRICS]
            lines.append(f"| {setting} - {UNWEIGHTED} | {variant} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", type=Path, help="a RAVDESS-layout demo corpus folder")
    source.add_argument("--manifest", type=Path, help="a clip manifest (path, speaker, emotion)")
    parser.add_argument("--model", required=True, help="the wav2vec2+probe encoder's folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--largest", type=int, default=192, help="clips of the largest class")
    parser.add_argument("--ratio", type=float, default=20.0, help="largest : smallest class")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    clips = corpus_clips(args.corpus) if args.corpus else manifest_clips(args.manifest)
    manifest = args.out / "imbalanced.csv"
    try:
        counts = write_imbalanced_manifest(clips, manifest, args.largest, args.ratio)
    except SettingsError as error:
        parser.error(str(error))
    print(f"clips per class: {counts} ({sum(counts.values())} clips)", flush=True)
    runs = {}
    for setting, variants in RUNS:
        out = args.out / setting
        runs[setting] = (run_study(manifest, args.model, setting, variants, out), out)
    print(tables(runs))


if __name__ == "__main__":
    main()
