"""Cross-validation results -> summary table (Markdown, CSV, JSON) and plots (PNG).

Inputs are what the k-fold job gathers:

- ``fold_results``: one dict per outer fold, e.g.
  ``{"fold": 1, "test_actors": [1, 2, 3, 4], "n_test": 240,
  "svm": {"accuracy": .., "uar": .., "macro_f1": ..},
  "svm+spknorm": {"accuracy": .., "uar": .., "macro_f1": ..},
  "wav2vec2": {"accuracy": .., "uar": .., "macro_f1": .., "best_epoch": 3}}``, optionally
  ``"train_class_counts": {"neutral": 64, ...}`` (the training side's clips per class);
  any number of named variants (:mod:`ser_ray.study.variants`), in the order they were given (the
  first is the one the others are compared with); a variant that did not run is simply
  absent (or ``None``).
- ``predictions``: the out-of-fold predictions (``predictions.csv``): columns ``path, actor,
  fold, true_label, pred_label, model`` and ``prob_<class>``; labels are class names or indices.
- ``class_names`` and a :class:`RunInfo` (which encoder each SSL variant ran, calm merged or
  not, fold scheme, resolved config).

Spread over folds is the **sample** standard deviation (``ddof=1``); the files say so.

>>> folds = [
...     {"fold": 1, "test_actors": [1, 2, 3, 4], "n_test": 4, "svm": {"accuracy": 0.5, "uar": 0.4,
...      "macro_f1": 0.3}},
...     {"fold": 2, "test_actors": [5, 6, 7, 8], "n_test": 4, "svm": {"accuracy": 0.7, "uar": 0.6,
...      "macro_f1": 0.5}},
... ]
>>> mean, std = fold_mean_std(folds)
>>> round(mean["svm"]["uar"], 3), round(std["svm"]["uar"], 4)
(0.5, 0.1414)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ser_ray.common import metrics
from ser_ray.corpus.clips import is_unknown_speaker
from ser_ray.corpus.protocol import PARTITIONS

log = logging.getLogger(__name__)

#: Headline metrics per model; UA (``uar``) first, as RAVDESS reports it.
METRICS: tuple[str, ...] = ("uar", "accuracy", "macro_f1")
MODEL_TITLES = {"svm": "SVM"}
METRIC_TITLES = {"uar": "UA", "accuracy": "acc", "macro_f1": "F1"}
STD_NOTE = "std is the sample standard deviation over folds (ddof=1)"
#: What mean and std are with a corpus's own partitions (resolved scheme ``partitions``).
PARTITIONS_NOTE = (
    "each row is one of the corpus's own test sets, the figure to report; mean and std "
    "(ddof=1) over the test sets only summarise them (test sets of different sizes and "
    "makeup, not a sample of folds)"
)
#: A fold row's test speakers are listed in summary.md up to this many; counted beyond.
LISTED_SPEAKERS = 12


class CoverageError(ValueError):
    """Out-of-fold predictions that do not cover every clip exactly once per model."""


@dataclasses.dataclass
class RunInfo:
    """What ran: goes into every summary file."""

    #: The encoder each SSL variant ran (hub id, local folder or ``"demo"``; ``+tapt`` when
    #: continued per fold), by variant name; empty when none ran.
    models: dict[str, str] = dataclasses.field(default_factory=dict)
    #: True when calm was merged into neutral (7 classes).
    merge_calm: bool = False
    #: Fold scheme: ``"contiguous"`` or ``"emobox"``.
    fold_scheme: str = "contiguous"
    #: The resolved run configuration (JSON-serializable).
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Where tuned wav2vec2 settings came from (``TunedParams.provenance``); None: defaults.
    params_provenance: dict[str, Any] | None = None
    #: The label map when it renames, merges or drops labels (corpus label -> class or None).
    label_map: dict[str, str | None] | None = None
    #: Per model: ``{"description", "per_fold": {fold: speakers}}`` it was trained on.
    trained_on: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: What each variant is (features, which normalisation ran): ``Variant.describe()``.
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: The fold models tested on other corpora (``ser_ray.study.cross_corpus``); None: none.
    cross_corpus: list[dict[str, Any]] | None = None


# ------------------------------------------------------------------------------------ checks
def check_coverage(predictions: pd.DataFrame, expected_paths: Iterable[str] | None = None) -> None:
    """Raise :class:`CoverageError` unless each model predicts each clip exactly once.

    The clip set is ``expected_paths`` when given, else the union of paths over all models.
    The message names the model and the duplicated, missing or unexpected paths.
    """
    missing_cols = [c for c in ("path", "model") if c not in predictions.columns]
    if missing_cols:
        raise CoverageError(f"predictions lack column(s) {missing_cols}")
    if predictions.empty:
        raise CoverageError("predictions are empty")
    expected = (
        set(map(str, expected_paths))
        if expected_paths is not None
        else set(predictions["path"].astype(str))
    )
    problems = []
    for model, rows in predictions.groupby("model", sort=True):
        paths = rows["path"].astype(str)
        counts = paths.value_counts()
        dup = sorted(counts.index[counts > 1])
        missing = sorted(expected - set(paths))
        extra = sorted(set(paths) - expected)
        if dup:
            problems.append(
                f"model {model!r}: {len(dup)} clip(s) predicted more than once: {_preview(dup)}"
            )
        if missing:
            problems.append(f"model {model!r}: {len(missing)} clip(s) missing: {_preview(missing)}")
        if extra:
            problems.append(f"model {model!r}: {len(extra)} unexpected clip(s): {_preview(extra)}")
    if problems:
        raise CoverageError(
            "predictions must cover every clip once per model; " + "; ".join(problems)
        )


def _preview(paths: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


# ------------------------------------------------------------------------------- statistics
def models_present(fold_results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Variant keys with test metrics in at least one fold, in first-appearance order."""
    present: dict[str, None] = {}
    for r in fold_results:
        for key, value in r.items():
            if isinstance(value, Mapping) and "uar" in value:
                present.setdefault(key)
    return list(present)


def _sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); NaN for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def fold_mean_std(
    fold_results: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Mean and sample std (ddof=1) over folds of each model's metrics (``{model: {metric}}``).

    Folds where a model has no result are left out of that model's figures.
    """
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for model in models_present(fold_results):
        runs = [r[model] for r in fold_results if r.get(model)]
        mean[model], std[model] = {}, {}
        for key in (*METRICS, "best_epoch"):
            values = [float(run[key]) for run in runs if run.get(key) is not None]
            if values:
                mean[model][key] = float(np.mean(values))
                std[model][key] = _sample_std(values)
    return mean, std


def paired_difference(
    fold_results: Sequence[Mapping[str, Any]], minuend: str, subtrahend: str, metric: str = "uar"
) -> dict[str, Any] | None:
    """Per-fold ``minuend - subtrahend`` of ``metric`` with mean and sample std (ddof=1).

    Only folds where both models ran count. None when no fold has both.
    """
    pairs = [
        (int(r["fold"]), float(r[minuend][metric]) - float(r[subtrahend][metric]))
        for r in fold_results
        if r.get(minuend) and r.get(subtrahend)
    ]
    if not pairs:
        return None
    diffs = [d for _, d in pairs]
    return {
        "metric": metric,
        "minuend": minuend,
        "subtrahend": subtrahend,
        "per_fold": [{"fold": f, "difference": d} for f, d in pairs],
        "mean": float(np.mean(diffs)),
        "std": _sample_std(diffs),
    }


def paired_differences(fold_results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every later variant minus the first, per metric (:func:`paired_difference`)."""
    present = models_present(fold_results)
    if not present:
        return []
    first, *others = present
    diffs = (paired_difference(fold_results, v, first, k) for v in others for k in METRICS)
    return [d for d in diffs if d is not None]


def _label_indices(labels: pd.Series, class_names: Sequence[str]) -> np.ndarray:
    """Class names or integer indices -> integer indices (raises on unknown names)."""
    if pd.api.types.is_integer_dtype(labels):
        return labels.to_numpy(dtype=np.int64)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(labels.astype(str)) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {list(class_names)}")
    return labels.astype(str).map(index).to_numpy(dtype=np.int64)


def prediction_stats(
    predictions: pd.DataFrame, class_names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per model, from the out-of-fold predictions: confusion matrix ``[true][pred]``,
    per-class recall (None where a class has no clips) and pooled metrics."""
    out: dict[str, dict[str, Any]] = {}
    n = len(class_names)
    for model in predictions["model"].drop_duplicates():
        rows = predictions[predictions["model"] == model]
        y_true = _label_indices(rows["true_label"], class_names)
        y_pred = _label_indices(rows["pred_label"], class_names)
        cm = metrics.confusion_matrix(y_true, y_pred, n)
        recall = metrics.per_class_recall(cm)
        out[model] = {
            "confusion": cm.tolist(),
            "per_class_recall": {
                c: _finite_or_none(r) for c, r in zip(class_names, recall, strict=True)
            },
            "pooled": metrics.classification_metrics(y_true, y_pred, n),
        }
    return out


def _finite_or_none(x: Any) -> Any:
    """NaN/inf -> None, recursively, so the JSON is strict."""
    if isinstance(x, Mapping):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# ---------------------------------------------------------------------------------- summary
def build_summary(
    fold_results: Sequence[Mapping[str, Any]],
    predictions: pd.DataFrame,
    class_names: Sequence[str],
    run_info: RunInfo | Mapping[str, Any],
    expected_paths: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` document (NaN written as null). Checks prediction coverage first."""
    info = run_info if isinstance(run_info, RunInfo) else RunInfo(**run_info)
    check_coverage(predictions, expected_paths)
    if not fold_results:
        raise ValueError("no fold results to summarize")
    _check_fold_sizes(fold_results, predictions)
    present = models_present(fold_results)
    mean, std = fold_mean_std(fold_results)
    stats = prediction_stats(predictions, class_names)
    folds = []
    for r in sorted(fold_results, key=lambda r: int(r["fold"])):
        row: dict[str, Any] = {
            "fold": int(r["fold"]),
            "test_actors": [int(a) for a in r["test_actors"]],
            "n_test": int(r["n_test"]),
        }
        if "test_speakers" in r:  # names, where they are not the numbers themselves
            row["test_speakers"] = [str(s) for s in r["test_speakers"]]
        if "name" in r:  # a session, predefined fold or test set name
            row["name"] = str(r["name"])
        if "train_class_counts" in r:  # the training side's clips per class
            row["train_class_counts"] = {k: int(n) for k, n in r["train_class_counts"].items()}
        for model in present:
            if r.get(model):
                row[model] = {k: r[model][k] for k in (*METRICS, "best_epoch") if k in r[model]}
        folds.append(row)
    summary = {
        "models": {v: m for v, m in info.models.items() if v in present},
        "models_run": present,
        "variants": {v: info.variants.get(v, {}) for v in present},
        "merge_calm": bool(info.merge_calm),
        "fold_scheme": info.fold_scheme,
        **({"label_map": info.label_map} if info.label_map else {}),
        "classes": list(class_names),
        "std_kind": PARTITIONS_NOTE if info.fold_scheme == PARTITIONS else STD_NOTE,
        "folds": folds,
        "mean": mean,
        "std": std,
        "paired_differences": paired_differences(fold_results),
        "per_class_recall": {m: s["per_class_recall"] for m, s in stats.items()},
        "confusion": {m: s["confusion"] for m, s in stats.items()},
        "pooled": {m: s["pooled"] for m, s in stats.items()},
        "params_provenance": info.params_provenance,
        "trained_on": info.trained_on,
        **({"cross_corpus": info.cross_corpus} if info.cross_corpus else {}),
        "config": info.config,
    }
    return _finite_or_none(summary)


def _check_fold_sizes(fold_results: Sequence[Mapping[str, Any]], predictions: pd.DataFrame) -> None:
    if "fold" not in predictions.columns:
        return
    counts = predictions.groupby(["model", "fold"]).size()
    for r in fold_results:
        for model in models_present(fold_results):
            if r.get(model) and (model, r["fold"]) in counts.index:
                n = int(counts[(model, r["fold"])])
                if n != int(r["n_test"]):
                    log.warning(
                        "fold %s: n_test=%s but %s has %d predictions",
                        r["fold"],
                        r["n_test"],
                        model,
                        n,
                    )


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _title(variant: str) -> str:
    return MODEL_TITLES.get(variant, variant)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return _pct(mean) if std is None else f"{_pct(mean)} ± {_pct(std)}"


def format_params(params: Mapping[str, Any]) -> str:
    """Chosen hyperparameters in one table cell: ``kernel=rbf C=10 gamma=scale``."""
    return " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def format_table(
    summary: Mapping[str, Any],
    fold_columns: Mapping[str, Callable[[Mapping[str, Any]], str]] | None = None,
) -> str:
    """The per-fold Markdown table with a final ``mean ± std`` row (percent, one decimal).

    Columns: fold, test speakers, n, then UA / accuracy / macro-F1 per model that ran, the
    best epoch of each SSL variant when known, and last ``fold_columns``: a title and the cell
    of each fold's result (empty in the mean row), e.g. the SVM's search time and chosen
    parameters.
    """
    fold_columns = fold_columns or {}
    present = list(summary["mean"])
    epochs_of = [m for m in present if "best_epoch" in summary["mean"][m]]
    named = any("test_speakers" in f for f in summary["folds"])
    partitions = summary.get("fold_scheme") == PARTITIONS
    header = ["test set" if partitions else "fold", "test speakers" if named else "test actors"]
    header.append("n")
    for m in present:
        header += [f"{_title(m)} {METRIC_TITLES[k]} %" for k in METRICS]
    header += [
        "best epoch" if len(epochs_of) == 1 else f"{_title(m)} best epoch" for m in epochs_of
    ]
    header += list(fold_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for f in summary["folds"]:
        cells = [str(f.get("name", f["fold"])), _speakers_cell(f), str(f["n_test"])]
        for m in present:
            cells += [_pct(f[m][k]) if m in f else "–" for k in METRICS]
        for m in epochs_of:
            be = f.get(m, {}).get("best_epoch")
            cells.append("–" if be is None else str(be))
        cells += [cell(f) for cell in fold_columns.values()]
        lines.append("| " + " | ".join(cells) + " |")
    n_total = sum(f["n_test"] for f in summary["folds"])
    cells = ["mean ± std over test sets" if partitions else "mean ± std", "", str(n_total)]
    for m in present:
        cells += [_pm(summary["mean"][m].get(k), summary["std"][m].get(k)) for k in METRICS]
    for m in epochs_of:
        be_mean, be_std = summary["mean"][m]["best_epoch"], summary["std"][m].get("best_epoch")
        cells.append(f"{be_mean:.1f}" + ("" if be_std is None else f" ± {be_std:.1f}"))
    cells += ["" for _ in fold_columns]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _scheme_line(summary: Mapping[str, Any]) -> str:
    n = len(summary["folds"])
    if summary["fold_scheme"] == PARTITIONS:
        return (
            f"- fold scheme: partitions (the corpus's own train, dev and {n} test sets, no "
            "k-fold: SSL epochs chosen on dev; SVM settings by a two-fold train/dev "
            "cross-validation, then refit on train + dev; speakers in protocol.json)"
        )
    return (
        f"- fold scheme: {summary['fold_scheme']} ({n} folds, speaker-independent; every "
        "fold's speakers in protocol.json)"
    )


def _speakers_cell(fold: Mapping[str, Any]) -> str:
    """A fold row's test speakers: their names (counted beyond :data:`LISTED_SPEAKERS`), and
    how many of its clips have an unknown speaker."""
    speakers = [str(s) for s in fold.get("test_speakers", fold["test_actors"])]
    known = [s for s in speakers if not is_unknown_speaker(s)]
    cell = ",".join(known) if len(known) <= LISTED_SPEAKERS else f"{len(known)} speakers"
    unknown = len(speakers) - len(known)
    return cell + (f" + {unknown} clips of unknown speakers" if unknown else "")


def _label_map_lines(label_map: Mapping[str, str | None] | None) -> list[str]:
    """The summary line of a label map that renames, merges or drops labels."""
    if not label_map:
        return []
    changed = [
        f"{label} -> {target if target is not None else 'left out'}"
        for label, target in label_map.items()
        if target != label
    ]
    return [f"- label map: {', '.join(changed)}"]


def _cross_corpus_lines(results: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The summary section of the cross-corpus tests: per test corpus and variant, UA, WA and
    macro-F1 (mean ± std over the fold models)."""
    if not results:
        return []
    lines = ["## Cross-corpus", "", f"{results[0]['what_ran']}.", ""]
    header = ["test corpus", "variant", "n", *(f"{METRIC_TITLES[k]} %" for k in METRICS)]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for result in results:
        for variant, mean in result["mean"].items():
            std = result["std"][variant]
            cells = [result["test_corpus"], _title(variant), str(result["n_clips"])]
            cells += [_pm(mean.get(k), std.get(k)) for k in METRICS]
            lines.append("| " + " | ".join(cells) + " |")
    for result in results:
        left = ", ".join(f"{k} ({n})" for k, n in result["left_out_labels"].items()) or "none"
        lines.append(
            f"- {result['test_corpus']}: classes {', '.join(result['classes'])}; clips left "
            f"out (label without a class of the study): {left}"
        )
    return [*lines, ""]


def format_markdown(summary: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """The whole ``summary.md``: run facts, fold table, paired difference, recalls, confusions."""
    classes = summary["classes"]
    ran = summary.get("models_run") or list(summary["mean"])
    lines = [
        "# ser_ray cross-validation summary",
        "",
        f"- variants run: {', '.join(ran) if ran else 'none'}",
        *(f"- {variant} model: {model}" for variant, model in summary["models"].items()),
    ]
    for variant, about in summary.get("variants", {}).items():
        if "mode" in about:
            lines.append(f"- {variant}: {about['mode']}; normalisation: {about['normalisation']}")
        elif "normalisation" in about:
            solver = f"; solver: {about['solver_description']}" if "solver" in about else ""
            lines.append(
                f"- {variant}: {about['features']} features, normalisation: "
                f"{about['normalisation']}{solver}"
            )
    lines += [
        f"- calm merged into neutral: {'yes' if summary['merge_calm'] else 'no'} "
        f"({len(classes)} classes: {', '.join(classes)})",
        _scheme_line(summary),
        *_label_map_lines(summary.get("label_map")),
        f"- figures in percent; {summary.get('std_kind', STD_NOTE)}",
        *(_provenance_lines(summary.get("params_provenance")) if _trains_ssl(summary) else []),
        *(
            f"- {MODEL_TITLES.get(m, m)} trained on: {t['description']}"
            for m, t in summary.get("trained_on", {}).items()
        ),
        "",
        "## Per fold",
        "",
        format_table(summary),
        "",
    ]
    diffs = summary.get("paired_differences")
    if diffs:
        lines += [f"## Paired differences against {diffs[0]['subtrahend']}", ""]
        for diff in diffs:
            per_fold = ", ".join(
                f"fold {d['fold']}: {100 * d['difference']:+.1f}" for d in diff["per_fold"]
            )
            lines.append(
                f"- {diff['minuend']} − {diff['subtrahend']} "
                f"{METRIC_TITLES.get(diff['metric'], diff['metric'])}: "
                f"{_signed_pct(diff['mean'])} ± {_pct(diff['std'])} points over "
                f"{len(diff['per_fold'])} folds ({per_fold})"
            )
        lines.append("")
    lines += _cross_corpus_lines(summary.get("cross_corpus"))
    recalls = summary.get("per_class_recall", {})
    if recalls:
        models = list(recalls)
        lines += ["## Recall per emotion (out-of-fold, %)", ""]
        lines.append("| emotion | " + " | ".join(_title(m) for m in models) + " |")
        lines.append("|---|" + "|".join("---" for _ in models) + "|")
        for c in classes:
            lines.append(f"| {c} | " + " | ".join(_pct(recalls[m].get(c)) for m in models) + " |")
        lines.append("")
    for model, cm in summary.get("confusion", {}).items():
        lines += [
            f"## Confusion matrix, {_title(model)} (rows true, columns predicted)",
            "",
        ]
        lines.append("| true \\ pred | " + " | ".join(classes) + " |")
        lines.append("|---|" + "|".join("---" for _ in classes) + "|")
        for c, row in zip(classes, cm, strict=True):
            lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"- ![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)


def _trains_ssl(summary: Mapping[str, Any]) -> bool:
    """Whether an SSL variant (fine-tuned or probe) trained in the run: an encoder ran for a
    variant of another family than the SVM's (``svm+ssl`` only reads a frozen one)."""
    return any(name.split("+")[0] != "svm" for name in summary["models"])


def _provenance_lines(provenance: Mapping[str, Any] | None) -> list[str]:
    if provenance is None:
        return ["- SSL training settings: defaults and flags (no --params file)"]
    line = f"SSL training settings from {provenance['file']}: {provenance['note']}"
    return [f"- **{line}**" if provenance["leaky"] else f"- {line}"]


def _signed_pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def _csv_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    present = list(summary["mean"])
    names = any("name" in f for f in summary["folds"])
    cols = ["fold", *(["name"] if names else []), "test_actors", "n_test"]
    for m in present:
        cols += [f"{m}_{k}" for k in METRICS]
        if "best_epoch" in summary["mean"][m]:
            cols.append(f"{m}_best_epoch")
    diffs = {
        f"{d['metric']}_{d['minuend']}_minus_{d['subtrahend']}": d
        for d in summary.get("paired_differences") or []
    }
    cols += list(diffs)
    rows = []
    for f in summary["folds"]:
        row: dict[str, Any] = {
            "fold": f["fold"],
            "test_actors": " ".join(map(str, f.get("test_speakers", f["test_actors"]))),
            "n_test": f["n_test"],
            **({"name": f.get("name", "")} if names else {}),
        }
        for m in present:
            for k in (*METRICS, "best_epoch"):
                if f"{m}_{k}" in cols:
                    row[f"{m}_{k}"] = f.get(m, {}).get(k)
        for col, diff in diffs.items():
            by_fold = {d["fold"]: d["difference"] for d in diff["per_fold"]}
            row[col] = by_fold.get(f["fold"])
        rows.append(row)
    for stat in ("mean", "std"):
        row = {"fold": stat, "test_actors": "", "n_test": ""}
        for m in present:
            for k in (*METRICS, "best_epoch"):
                if f"{m}_{k}" in cols:
                    row[f"{m}_{k}"] = summary[stat][m].get(k)
        for col, diff in diffs.items():
            row[col] = diff[stat]
        rows.append(row)
    return cols, rows


def write_summary(
    out_dir: str | Path,
    fold_results: Sequence[Mapping[str, Any]],
    predictions: pd.DataFrame,
    class_names: Sequence[str],
    run_info: RunInfo | Mapping[str, Any],
    histories: Mapping[str, Mapping[int, Sequence[Mapping[str, float]]]] | None = None,
    lr_schedules: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    expected_paths: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Write ``summary.json``, ``summary.csv``, ``summary.md`` and the PNG plots to ``out_dir``.

    ``histories`` maps variant -> fold -> per-epoch dicts (``{"epoch": 1, "train/loss": ..,
    "val/uar": ..}``) for learning curves; ``lr_schedules`` maps variant -> the ``(step, lr)``
    sequence its encoder actually used.
    Returns the summary dict with ``"files"`` (name -> path) added.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = build_summary(fold_results, predictions, class_names, run_info, expected_paths)
    plots = write_plots(out, summary, histories=histories, lr_schedules=lr_schedules)
    summary["plots"] = [p.name for p in plots]

    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    cols, rows = _csv_rows(summary)
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.md").write_text(format_markdown(summary, [p.name for p in plots]))
    files = {name: out / name for name in ("summary.json", "summary.csv", "summary.md")}
    files.update({p.name: p for p in plots})
    log.info("summary written to %s (%d plots)", out, len(plots))
    return {**summary, "files": {k: str(v) for k, v in files.items()}}


# ------------------------------------------------------------------------------------ plots
def _figure(width_in: float, height_in: float):
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_confusion(
    cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, title: str
) -> Path:
    """Row-normalized confusion matrix (colour) with counts written in the cells."""
    counts = np.asarray(cm, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="recall share of row")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in ticks:
        for j in ticks:
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_fold_bars(summary: Mapping[str, Any], path: str | Path, metric: str = "uar") -> Path:
    """Grouped bars of ``metric`` per fold and model, with each model's mean as a dashed line."""
    present = list(summary["mean"])
    folds = [f["fold"] for f in summary["folds"]]
    x = np.arange(len(folds))
    width = 0.8 / max(len(present), 1)
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    for i, m in enumerate(present):
        values = [100 * (f.get(m, {}).get(metric) or 0.0) for f in summary["folds"]]
        bars = ax.bar(x + (i - (len(present) - 1) / 2) * width, values, width, label=_title(m))
        ax.axhline(
            100 * summary["mean"][m][metric], ls="--", lw=1, color=bars.patches[0].get_facecolor()
        )
    ax.set_xticks(x, [str(f) for f in folds])
    ax.set_xlabel("fold (test speakers held out)")
    ax.set_ylabel(f"{METRIC_TITLES.get(metric, metric)} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{METRIC_TITLES.get(metric, metric)} per fold (dashed: mean)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_learning_curves(
    histories: Mapping[int, Sequence[Mapping[str, float]]], path: str | Path
) -> Path:
    """One panel per metric key (losses, then the rest), one line per fold, epoch on x."""
    from matplotlib.ticker import MaxNLocator

    keys = sorted(
        {
            k
            for h in histories.values()
            for row in h
            for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float))
        },
        key=lambda k: ("loss" not in k, k),
    )
    if not keys:
        raise ValueError("histories hold no numeric metric besides 'epoch'")
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _figure(4.0 * ncols, 3.0 * nrows)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for fold, rows in sorted(histories.items()):
            pts = [(r.get("epoch", j + 1), r[key]) for j, r in enumerate(rows) if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"fold {fold}")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_lr_schedule(lr_schedule: Sequence[tuple[int, float]], path: str | Path) -> Path:
    """The learning rate actually used, per optimizer step."""
    if not lr_schedule:
        raise ValueError("empty LR schedule")
    steps, lrs = zip(*lr_schedule, strict=True)
    fig = _figure(6.0, 3.5)
    ax = fig.add_subplot()
    ax.plot(steps, lrs)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedule used")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_plots(
    out_dir: str | Path,
    summary: Mapping[str, Any],
    histories: Mapping[str, Mapping[int, Sequence[Mapping[str, float]]]] | None = None,
    lr_schedules: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> list[Path]:
    """All PNGs for a summary: confusion per model, UA per fold, and per SSL variant its
    learning curves and encoder LR schedule."""
    out = Path(out_dir)
    paths = []
    for model, cm in summary["confusion"].items():
        title = f"{_title(model)} confusion (out-of-fold)"
        paths.append(plot_confusion(cm, summary["classes"], out / f"confusion_{model}.png", title))
    paths.append(plot_fold_bars(summary, out / "folds_uar.png"))
    for variant, per_fold in (histories or {}).items():
        paths.append(plot_learning_curves(per_fold, out / f"learning_curves_{variant}.png"))
    for variant, schedule in (lr_schedules or {}).items():
        if schedule:
            paths.append(plot_lr_schedule(schedule, out / f"lr_schedule_{variant}.png"))
    return paths
