"""Class weighting for imbalanced corpora: the weights, the loss that uses them, the SVM grid
that fixes them, and the training class counts in the summary."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from test_summary import CLASSES as SUMMARY_CLASSES
from test_summary import RUN, fold_results, predictions
from test_train_loop import LABELS, clips, tiny_config  # noqa: F401 - clips: a fixture

from ser_ray.common.errors import SettingsError
from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.models import svm
from ser_ray.study import summary
from ser_ray.study.config import KFoldConfig, study_train_config
from ser_ray.study.kfold import _fold_row
from ser_ray.study.svm_runs import class_weighted_grid
from ser_ray.training.class_weights import (
    balanced_weights,
    class_weights,
    imbalance_ratio,
    resolve_class_weight,
)
from ser_ray.training.clip_data import count_classes
from ser_ray.training.config import TrainConfig, build_model
from ser_ray.training.engine import seed_everything
from ser_ray.training.finetune import (
    _micro_batch_loss,
    loss_weights,
    run_training,
    train_class_counts,
)

CPU = torch.device("cpu")
#: RAVDESS's training side of one fold: neutral has half the clips of each other emotion.
RAVDESS_COUNTS = [80, 160, 160, 160, 160, 160, 160, 160]


def test_balanced_weights_are_scikit_learns_and_average_one_over_the_clips():
    counts = [100, 40, 5, 0, 20]
    y = np.repeat(np.arange(len(counts)), counts)
    weights = balanced_weights(counts)
    present = np.array([0, 1, 2, 4])
    sklearn = compute_class_weight("balanced", classes=present, y=y)
    np.testing.assert_allclose(weights[present], sklearn)
    assert weights[3] == 0.0  # a class without training clips adds no loss term
    assert weights[y].mean() == pytest.approx(1.0)  # the loss keeps its scale
    assert weights[2] == pytest.approx(165 / (4 * 5))


def test_auto_weights_an_imbalanced_corpus_only():
    assert imbalance_ratio(RAVDESS_COUNTS) == 2.0
    assert resolve_class_weight("auto", RAVDESS_COUNTS) == "none"
    assert class_weights("auto", RAVDESS_COUNTS) is None  # RAVDESS trains as it always did
    skewed = [400, 200, 100, 20]  # 20:1
    assert resolve_class_weight("auto", skewed) == "balanced"
    np.testing.assert_allclose(class_weights("auto", skewed), balanced_weights(skewed))
    assert class_weights("none", skewed) is None
    np.testing.assert_allclose(class_weights("balanced", RAVDESS_COUNTS)[:2], [1.875, 0.9375])
    with pytest.raises(ValueError, match="class_weight"):
        resolve_class_weight("focal", skewed)
    with pytest.raises(ValueError, match="class_weight"):
        TrainConfig(class_weight="focal")


class _Head(torch.nn.Module):
    """A linear classifier with the HF output's ``logits`` and mean cross-entropy ``loss``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 4)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


def test_the_loss_weights_each_clip_by_its_class():
    head = _Head()
    batch = {"x": torch.randn(5, 3), "labels": torch.tensor([0, 0, 1, 3, 3])}
    weights = torch.tensor([0.5, 2.0, 1.0, 4.0])
    loss, logs = _micro_batch_loss(head, batch, device=CPU, group_clips=8, weights=weights)
    per_clip = torch.nn.functional.cross_entropy(
        head.linear(batch["x"]), batch["labels"], reduction="none"
    )
    expected = (weights[batch["labels"]] * per_clip).sum()
    assert loss.item() == pytest.approx(expected.item() / 8)  # its share of the group of 8
    assert logs["loss_sum"] == pytest.approx(expected.item())
    unweighted, _ = _micro_batch_loss(head, batch, device=CPU, group_clips=8)
    ones, _ = _micro_batch_loss(head, batch, device=CPU, group_clips=8, weights=torch.ones(4))
    assert ones.item() == pytest.approx(unweighted.item())
    assert unweighted.item() == pytest.approx(per_clip.sum().item() / 8)


def test_class_counts_from_clips_and_from_a_features_folder(clips, tmp_path):  # noqa: F811
    assert train_class_counts(clips, 8) == [2] * 8
    frame = pd.DataFrame(
        {"actor": [1, 1, 2, 2, 2, 3], "emotion": ["calm", "neutral", "happy", "calm", "sad", "sad"]}
    )
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "part.parquet")
    merged = {"neutral": 0, "calm": 0, "happy": 1}  # sad: dropped by the label map
    assert count_classes(tmp_path, [1, 2], merged) == [3, 1]
    assert count_classes(tmp_path, [], merged) == [0, 0]


def test_loss_weights_follow_the_setting_and_the_counts(clips, caplog):  # noqa: F811
    balanced = tiny_config(class_weight="balanced")
    given = [30, 10, 10, 10, 10, 10, 10, 10]
    weights = loss_weights(balanced, clips, given, 8, CPU)
    np.testing.assert_allclose(weights.numpy(), balanced_weights(given), rtol=1e-6)
    np.testing.assert_allclose(loss_weights(balanced, clips, None, 8, CPU).numpy(), 1.0)
    assert loss_weights(tiny_config(class_weight="auto"), clips, None, 8, CPU) is None
    with caplog.at_level(logging.INFO, logger="ser_ray.training.finetune"):
        assert loss_weights(tiny_config(class_weight="auto"), clips, given, 8, CPU) is None
    assert "class_weight=auto: none loss" in caplog.text
    assert loss_weights(tiny_config(class_weight="none"), clips, given, 8, CPU) is None


def _trained(cfg: TrainConfig, clips, class_counts=None):  # noqa: F811
    seed_everything(cfg.seed)
    model, fe = build_model(cfg, list(LABELS))
    outcome = run_training(cfg, model, fe, clips, None, class_counts=class_counts)
    return outcome.state.history[-1]["train/loss"], model


def test_weighted_training_differs_and_auto_on_balanced_classes_is_unweighted(clips):  # noqa: F811
    kw = dict(epochs=1, head_warmup_epochs=1, probe=True, use_weighted_layer_sum=True)
    plain_loss, plain = _trained(tiny_config(class_weight="none", **kw), clips)
    auto_loss, auto = _trained(tiny_config(class_weight="auto", **kw), clips)
    assert auto_loss == plain_loss  # 2 clips of every class: auto is the unweighted loss
    for a, b in zip(plain.parameters(), auto.parameters(), strict=True):
        assert torch.equal(a, b)
    skewed = [40, 2, 2, 2, 2, 2, 2, 2]  # as if neutral had 20x the clips of every other class
    weighted_loss, _ = _trained(tiny_config(class_weight="auto", **kw), clips, skewed)
    assert weighted_loss != pytest.approx(plain_loss)


def test_the_svm_grid_fixes_the_class_weight_the_setting_names():
    full = svm.svm_grid(smoke_test=True)
    assert class_weighted_grid("auto", True) is None  # the fixed grid searches both, as before
    balanced = class_weighted_grid("balanced", True)
    unweighted = class_weighted_grid("none", True)
    assert len(balanced) == len(unweighted) == len(full) // 2
    assert {p["class_weight"] for p in balanced} == {"balanced"}
    assert {p["class_weight"] for p in unweighted} == {None}
    fitted = svm.make_calibrated_svm(balanced[0])  # the SVC itself receives it
    assert fitted.estimator.named_steps["svc"].class_weight == "balanced"


def test_a_fixed_class_weight_with_the_bayes_svm_search_is_refused():
    train = study_train_config(class_weight="balanced")
    with pytest.raises(SettingsError, match="--svm-search grid"):
        KFoldConfig(train=train, svm_search="bayes")
    KFoldConfig(train=train, svm_search="bayes", variants=("wav2vec2",))  # no SVM: fine
    KFoldConfig(train=study_train_config(), svm_search="bayes")  # auto: fine


def test_the_summary_records_each_folds_training_class_counts(tmp_path):
    protocol = ravdess_protocol()
    emotions = list(protocol.classes)
    df = pd.DataFrame(
        [(a, e) for a in range(1, 25) for e in emotions for _ in range(1 if e == "neutral" else 2)],
        columns=["actor", "emotion"],
    )
    row = _fold_row(protocol, 1, df)
    assert row["n_test"] == 4 * 15
    assert row["train_class_counts"] == {e: 20 if e == "neutral" else 40 for e in emotions}
    folds = fold_results()
    folds[0]["train_class_counts"] = {"neutral": 20, "calm": 40}
    doc = summary.build_summary(folds, predictions(), SUMMARY_CLASSES, RUN)
    assert doc["folds"][0]["train_class_counts"] == {"neutral": 20, "calm": 40}
    assert "train_class_counts" not in doc["folds"][1]
    assert summary.models_present(folds) == ["svm", "wav2vec2"]
