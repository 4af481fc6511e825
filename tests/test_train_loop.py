"""The training loop: batching, optimizer, clipping, overfitting, NaN, exact resume, Ray."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from ser_ray.corpus import ravdess
from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.models.ssl import RANDOM_DEMO_MODEL, demo_feature_extractor
from ser_ray.training.clip_data import (
    ClipArrays,
    collate,
    length_grouped_batches,
    predictions_frame,
    read_split,
    table_from_arrow,
)
from ser_ray.training.config import TrainConfig, build_model
from ser_ray.training.engine import NonFiniteLossError, build_engine, seed_everything
from ser_ray.training.finetune import (
    build_optimizer,
    evaluate,
    refit,
    run_training,
    standardize_head,
    train_one_epoch,
    warm_up_head,
)

CLASSES = ravdess.class_names()  # 8 emotions
LABELS = {name: i for i, name in enumerate(CLASSES)}  # label -> class index
CPU = torch.device("cpu")


def constant_lr_engine(model, cfg):
    """The run's optimizer steps with the LR held at its peak (schedules: test_schedule)."""
    flat = dataclasses.replace(cfg, warmup_frac=0.0, decay_start_frac=1.0)
    return build_engine(model, build_optimizer(model, cfg), flat, total_steps=10_000, device=CPU)


def synthetic_table(clips_per_class: int = 1, seconds: float = 1.0, seed: int = 0) -> pa.Table:
    """Features-like rows: a tone whose pitch says the emotion, random length and noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, emotion in enumerate(CLASSES):
        for j in range(clips_per_class):
            n = int(16_000 * seconds * rng.uniform(0.8, 1.2))
            t = np.arange(n) / 16_000
            wave = np.sin(2 * np.pi * (150 + 60 * k) * t) + 0.3 * rng.standard_normal(n)
            speaker = 1 + (j % 24)
            name = f"03-01-{k + 1:02d}-01-01-{j % 2 + 1:02d}-{speaker:02d}.wav"
            rows.append(
                {
                    "path": f"/x/Actor_{speaker:02d}/{name}",
                    "actor": speaker,
                    "emotion": emotion,
                    "waveform": wave.astype(np.float32),
                }
            )
    frame = pd.DataFrame(rows)
    return pa.Table.from_pandas(frame, preserve_index=False).cast(
        pa.schema(
            [
                ("path", pa.string()),
                ("actor", pa.int32()),
                ("emotion", pa.string()),
                ("waveform", pa.list_(pa.float32())),
            ]
        )
    )


def tiny_config(**kw) -> TrainConfig:
    base = dict(
        model=RANDOM_DEMO_MODEL,
        lr_encoder=1e-3,
        lr_head=3e-3,
        batch_size=4,
        epochs=2,
        head_dropout=0.0,
        mask_time_prob=0.0,
        warmup_frac=0.0,
        use_feature_cache=False,
        early_stopping_patience=None,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def clips() -> ClipArrays:
    return table_from_arrow(synthetic_table(2), "waveform", LABELS, demo_feature_extractor())


def test_table_from_arrow_sorts_and_normalises(clips):
    assert len(clips) == 16 and clips.paths == sorted(clips.paths)
    assert [CLASSES[i] for i in clips.labels] == clips.emotions
    assert all(abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3 for x in clips.inputs)
    merged = table_from_arrow(
        synthetic_table(1),
        "waveform",
        ravdess_protocol(merge_calm=True).label_index(),
        demo_feature_extractor(),
    )
    assert merged.labels.tolist() == [0, 0, 1, 2, 3, 4, 5, 6]  # calm -> neutral


def test_length_grouped_batches():
    lengths = np.random.default_rng(0).integers(10, 1000, size=103)
    batches = length_grouped_batches(lengths, 8, seed=1, epoch=0, group_factor=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(103))  # every clip once
    assert batches == length_grouped_batches(lengths, 8, seed=1, epoch=0, group_factor=4)
    assert batches != length_grouped_batches(lengths, 8, seed=1, epoch=1, group_factor=4)
    # similar lengths: within-batch spread far below the spread of random batches of 8
    spread = np.mean([np.ptp(lengths[b]) for b in batches if len(b) == 8])
    assert spread < 0.35 * np.ptp(lengths)
    r0 = length_grouped_batches(lengths, 8, seed=1, epoch=0, rank=0, world_size=2)
    r1 = length_grouped_batches(lengths, 8, seed=1, epoch=0, rank=1, world_size=2)
    assert len(r0) == len(r1) == 6 and not set(sum(r0, [])) & set(sum(r1, []))
    # one batch, two ranks (a small last window): no rank gets one, so they stay in step
    assert length_grouped_batches([5, 6, 7], 8, seed=1, epoch=0, rank=0, world_size=2) == []


def test_collate_pads_to_the_longest_in_the_batch(clips):
    batch = collate(clips, [0, 5, 9])
    lengths = [len(clips.inputs[i]) for i in (0, 5, 9)]
    assert batch["input_values"].shape == (3, max(lengths))
    assert batch["lengths"].tolist() == lengths
    assert batch["labels"].tolist() == clips.labels[[0, 5, 9]].tolist()
    short = int(np.argmin(lengths))
    assert torch.all(batch["input_values"][short, lengths[short] :] == 0)


def test_optimizer_groups_and_weight_decay():
    cfg = tiny_config(weight_decay=0.05, lr_encoder=2e-5, lr_head=1e-3)
    model, _ = build_model(cfg, CLASSES)
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"encoder", "encoder/no_decay", "head", "head/no_decay"}
    assert groups["encoder"]["lr"] == 2e-5 and groups["head"]["lr"] == 1e-3
    assert (
        groups["encoder/no_decay"]["weight_decay"] == 0 and groups["head"]["weight_decay"] == 0.05
    )
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [
        names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]
    ]
    assert "model.layer_weights" in no_decay and "model.classifier.bias" in no_decay
    assert all(
        "bias" in n
        or "norm" in n
        or n in ("model.layer_weights", "model.wav2vec2.masked_spec_embed")
        for n in no_decay
    )
    everything = {names[id(p)] for g in opt.param_groups for p in g["params"]}
    assert not any(n.startswith("model.wav2vec2.feature_extractor.") for n in everything)


def _one_epoch(cfg, clips, monkeypatch):
    torch.manual_seed(0)
    model, _ = build_model(cfg, CLASSES)
    engine = constant_lr_engine(model, cfg)
    opt = engine.optimizer
    calls, norms = [], []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or real_clip(*a, **k)
    )
    real_step = opt.step

    def step(*a, **k):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(
            torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            ).item()
        )
        return real_step(*a, **k)

    opt.step = step
    batches = length_grouped_batches(clips.lengths, cfg.batch_size, seed=0, epoch=0)
    steps, metrics = train_one_epoch(
        engine, [collate(clips, b) for b in batches], cfg, epoch=0, step=0
    )
    return steps, metrics, calls, norms


def test_clipping_off_by_default_and_on_when_set(clips, monkeypatch):
    assert TrainConfig().grad_clip_norm is None
    steps, _, calls, norms = _one_epoch(tiny_config(), clips, monkeypatch)
    assert steps == 4 and calls == [] and max(norms) > 0.01
    _, _, calls, norms = _one_epoch(tiny_config(grad_clip_norm=0.01), clips, monkeypatch)
    assert len(calls) == 4 and max(norms) <= 0.01 * (1 + 1e-4)


def test_gradient_accumulation_matches_a_big_batch():
    rng = np.random.default_rng(0)
    pooled = ClipArrays(
        "pooled",
        [f"p{i}" for i in range(8)],
        np.ones(8, np.int64),
        ["x"] * 8,
        np.arange(8) % 8,
        [rng.standard_normal((3, 64)).astype(np.float32) for _ in range(8)],
    )
    results = []
    for accum, batch in ((1, 8), (4, 2)):
        cfg = tiny_config(probe=True, batch_size=batch, grad_accum_steps=accum)
        torch.manual_seed(0)
        model, _ = build_model(cfg, CLASSES)
        engine = constant_lr_engine(model, cfg)
        steps, metrics = train_one_epoch(
            engine,
            [collate(pooled, list(range(i, i + batch))) for i in range(0, 8, batch)],
            cfg,
            epoch=0,
            step=0,
        )
        head = model.model.classifier.weight.detach().clone()
        results.append((steps, metrics["train/loss"], head))
    assert results[0][0] == results[1][0] == 1  # one optimizer step either way
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-6)
    torch.testing.assert_close(results[0][2], results[1][2], atol=1e-6, rtol=0)


def test_tiny_model_overfits_a_small_batch():
    """8 clips, one per emotion: the loss must fall from ~ln 8 (chance) below 0.1 ln 8, i.e.
    the model puts > 81% probability on the right class of every clip on average."""
    table = table_from_arrow(synthetic_table(1), "waveform", LABELS, demo_feature_extractor())
    cfg = tiny_config(batch_size=8, lr_encoder=1e-3, lr_head=3e-2, weight_decay=0.0)
    torch.manual_seed(0)
    model, _ = build_model(cfg, CLASSES)
    engine = constant_lr_engine(model, cfg)
    losses = []
    for epoch in range(40):
        _, metrics = train_one_epoch(
            engine, [collate(table, range(8))], cfg, epoch=epoch, step=epoch
        )
        losses.append(metrics["train/loss"])
        if losses[-1] < 0.1 * math.log(8) / 2:
            break
    assert losses[0] == pytest.approx(math.log(8), abs=0.2)
    val, probs, scored = evaluate(model, table, batch_size=8, device=CPU, num_classes=8)
    assert scored.paths == table.paths and scored.labels.tolist() == table.labels.tolist()
    assert val["val/loss"] < 0.1 * math.log(8), losses
    assert val["val/accuracy"] == 1.0 and val["val/uar"] == 1.0
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)


def test_nan_loss_names_epoch_and_step(clips):
    bad = ClipArrays(
        clips.kind,
        clips.paths,
        clips.speakers,
        clips.emotions,
        clips.labels,
        [x.copy() for x in clips.inputs],
    )
    for x in bad.inputs:
        x[100] = np.nan
    cfg = tiny_config()
    model, _ = build_model(cfg, CLASSES)
    engine = constant_lr_engine(model, cfg)
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 8 .*lower the learning rates"):
        train_one_epoch(engine, [collate(bad, [0, 1])], cfg, epoch=2, step=7)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_from_checkpoint_ends_with_the_same_weights(tmp_path):
    train = table_from_arrow(
        synthetic_table(1, seed=1), "waveform", LABELS, demo_feature_extractor()
    )
    val = table_from_arrow(synthetic_table(1, seed=2), "waveform", LABELS, demo_feature_extractor())
    # dropout and SpecAugment on: the RNG states must be restored too
    cfg = tiny_config(
        epochs=3,
        head_dropout=0.1,
        spec_augment=True,
        mask_time_prob=0.3,
        encoder_dropout=0.1,
        warmup_frac=0.2,
        decay_start_frac=0.5,
    )

    def fresh():
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        return build_model(cfg, CLASSES)

    model, fe = fresh()
    full = run_training(cfg, model, fe, train, val, log_dir=tmp_path / "tb")
    final_full = _weights(model)

    class Crash(Exception):
        pass

    def crash_after_first(metrics, write):
        write(tmp_path / f"ckpt{metrics['epoch']}")
        if metrics["epoch"] == 1:
            raise Crash

    model, fe = fresh()
    with pytest.raises(Crash):
        run_training(cfg, model, fe, train, val, on_epoch_end=crash_after_first)
    model, fe = build_model(cfg, CLASSES)  # a new process would start from scratch
    torch.manual_seed(123)  # and with other RNG states: the checkpoint must restore them
    resumed = run_training(
        cfg, model, fe, train, val, resume_from=tmp_path / "ckpt1", on_epoch_end=crash_after_first
    )
    assert resumed.state.step == full.state.step == 3 * 2
    timing = ("train/clips_per_s", "train/epoch_s")
    drop = lambda hist: [{k: v for k, v in h.items() if k not in timing} for h in hist]  # noqa: E731
    assert drop(resumed.state.history) == drop(full.state.history)
    assert resumed.state.best_epoch == full.state.best_epoch
    final_resumed = _weights(model)
    for name, value in final_full.items():  # best-epoch weights, loaded at the end
        assert torch.equal(final_resumed[name], value), name
    latest_full = torch.load(tmp_path / "ckpt3" / "train_state.pt", weights_only=False)
    assert latest_full["progress"]["epoch"] == 3
    # TensorBoard scalars of the uninterrupted run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/lr_encoder",
        "val/uar",
        "val/accuracy",
        "val/macro_f1",
        "val/loss",
    } <= tags
    assert len(events.Scalars("train/loss")) == 6 and len(events.Scalars("val/uar")) == 3


def test_predictions_frame_format(clips):
    probs = np.random.default_rng(0).dirichlet(np.ones(8), size=len(clips))
    frame = predictions_frame(clips, probs, CLASSES, fold=3)
    assert list(frame.columns[:6]) == ["path", "actor", "fold", "true_label", "pred_label", "model"]
    assert [c for c in frame.columns if c.startswith("prob_")] == [f"prob_{c}" for c in CLASSES]
    assert (frame["model"] == "wav2vec2").all() and (frame["fold"] == 3).all()
    np.testing.assert_allclose(frame.filter(like="prob_").sum(axis=1), 1.0)
    assert frame["true_label"].tolist() == [CLASSES[i] for i in clips.labels]


def _assert_predictions_agree_with_predict_and_pipeline(preds, model_dir, demo_features):
    """The out-of-fold probabilities of a run (cached CNN path, padding rule) are those of
    jobs/predict.py and of plain transformers' pipeline() on the same clips."""
    from transformers import pipeline

    from ser_ray.predict import load_fold_models, model_probabilities

    rows = preds.iloc[:3]
    table = read_split(demo_features / "features", sorted(set(rows["actor"])))
    by_path = dict(
        zip(table.column("path").to_pylist(), table.column("waveform").to_pylist(), strict=True)
    )
    waves = [np.asarray(by_path[p], dtype=np.float32) for p in rows["path"]]
    expected = rows[[f"prob_{c}" for c in CLASSES]].to_numpy()
    [(model, fe)], names = load_fold_models([model_dir])
    assert names == CLASSES and model.config.model_type == "wav2vec2"
    np.testing.assert_allclose(model_probabilities(model, fe, waves), expected, atol=1e-5, rtol=0)
    classify = pipeline("audio-classification", model=str(model_dir), top_k=None, device="cpu")
    for wave, row in zip(waves, expected, strict=True):
        scores = {d["label"]: d["score"] for d in classify(wave)}
        np.testing.assert_allclose([scores[c] for c in CLASSES], row, atol=1e-5, rtol=0)


def fit_fold_as_the_study_does(
    features_dir: Path, fold: int, cfg: TrainConfig, out: Path, cache_dir: Path, **trainer_kwargs
):
    """One fold through the study's path without Tune: its inputs (``cache_dir``), its
    ``TorchTrainer`` (Ray run folder ``out/ray/fold_<k>``, TensorBoard
    ``out/tensorboard/fold_<k>``), its final checkpoint read back into ``out/fold_<k>``."""
    from ser_ray.distributed import train_edge
    from ser_ray.distributed.fold_inputs import build_fold_inputs
    from ser_ray.distributed.fold_trainer import build_fold_trainer, fold_result_from_checkpoint
    from ser_ray.distributed.fold_work import FoldWork

    work = FoldWork(
        train=cfg,
        inputs=build_fold_inputs(features_dir, cfg, cache_dir),
        fold=fold,
        protocol=ravdess_protocol(n_val_speakers=cfg.n_val_speakers),
        log_dir=str(out / "tensorboard" / f"fold_{fold}"),
    )
    trainer = build_fold_trainer(
        work, storage_path=out / "ray", name=f"fold_{fold}", **trainer_kwargs
    )
    checkpoint = train_edge.fit(trainer, f"fold {fold}")
    return fold_result_from_checkpoint(checkpoint, out / f"fold_{fold}")


def test_fit_fold_on_demo_features_with_ray(demo_features, tmp_path):
    """One fold through TorchTrainer (1 worker) with the feature cache, then a restart."""
    cfg = tiny_config(epochs=2, batch_size=8, use_feature_cache=True, n_val_speakers=4)
    run = tmp_path / "run"
    result = fit_fold_as_the_study_does(demo_features / "features", 2, cfg, run, tmp_path / "cache")
    test_speakers, _, val_speakers = ravdess_protocol().split(2)
    assert result.fold == 2
    assert test_speakers == [5, 6, 7, 8] and len(val_speakers) == 4
    preds = result.predictions
    assert len(preds) == 4 * 16 and set(preds["actor"]) == {5, 6, 7, 8}
    assert not set(preds["actor"]) & set(val_speakers)
    np.testing.assert_allclose(preds.filter(like="prob_").sum(axis=1), 1.0, atol=1e-6)
    for key in ("test/accuracy", "test/uar", "test/macro_f1", "best_epoch", "best/val_uar"):
        assert key in result.metrics
    acc = (preds["true_label"] == preds["pred_label"]).mean()
    assert result.metrics["test/accuracy"] == pytest.approx(acc)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert {"train/loss", "train/lr", "val/loss", "val/accuracy", "val/uar", "val/macro_f1"} <= set(
        result.history[0]
    )
    assert 1 <= int(result.metrics["best_epoch"]) <= 2
    _assert_predictions_agree_with_predict_and_pipeline(preds, result.model_dir, demo_features)
    assert list((tmp_path / "cache").glob("cnn-*/cache_info.json"))
    assert list((tmp_path / "run" / "tensorboard" / "fold_2").glob("events.*"))
    # a second call finds the ended run and reports its final checkpoint again: no retraining,
    # no second scoring, no new checkpoint
    checkpoints = {p: p.stat().st_mtime_ns for p in (run / "ray" / "fold_2").glob("checkpoint_*/")}
    assert len(checkpoints) >= 2  # the epochs' and the final one
    again = fit_fold_as_the_study_does(demo_features / "features", 2, cfg, run, tmp_path / "cache")
    assert again.metrics == result.metrics
    assert again.history == result.history
    assert {p: p.stat().st_mtime_ns for p in (run / "ray" / "fold_2").glob("checkpoint_*/")} == (
        checkpoints
    )


def test_transformer_frozen_for_the_first_steps(clips):
    cfg = tiny_config(freeze_encoder_steps=2)
    torch.manual_seed(0)
    model, _ = build_model(cfg, CLASSES)
    engine = constant_lr_engine(model, cfg)
    q = model.encoder.encoder.layers[0].attention.q_proj.weight
    snapshots = [(q.detach().clone(), model.model.classifier.weight.detach().clone())]
    batches = length_grouped_batches(clips.lengths, 4, seed=0, epoch=0)
    train_one_epoch(
        engine, [collate(clips, b) for b in batches], cfg, epoch=0, step=0,
        on_step=lambda step, _: snapshots.append(
            (q.detach().clone(), model.model.classifier.weight.detach().clone())
        ),
    )  # fmt: skip
    enc_moved = [
        not torch.equal(a[0], b[0]) for a, b in zip(snapshots, snapshots[1:], strict=False)
    ]
    head_moved = [
        not torch.equal(a[1], b[1]) for a, b in zip(snapshots, snapshots[1:], strict=False)
    ]
    assert enc_moved == [False, False, True, True] and all(head_moved)


def test_the_head_input_is_standardised_with_the_training_clips_statistics(clips):
    cfg = tiny_config()
    model, _ = build_model(cfg, CLASSES)
    model.train()
    standardize_head(model, clips, batch_size=3, device=CPU)
    assert model.training  # left as it was
    with torch.no_grad():  # the layer sum of every clip alone, the encoder in eval mode
        model.eval()
        inputs = [collate(clips, [i]) for i in range(len(clips))]
        x = torch.cat(
            [
                model.layer_sum(
                    model.pooled_inputs(**{k: v for k, v in one.items() if k != "labels"})
                )
                for one in inputs
            ]
        ).double()
    torch.testing.assert_close(model.head_shift.double(), x.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        model.head_scale.double(), x.std(0, correction=0), atol=1e-5, rtol=1e-4
    )


CLASSES_4 = ["neutral", "happy", "sad", "angry"]


def pooled_clips(per_class: int, seed: int) -> tuple[ClipArrays, np.ndarray]:
    """Pooled layer states (3 layers x 64) as a frozen encoder gives them: one large offset
    per feature, and a class signal small next to it (spread ~0.05 around offsets ~0.3),
    the same in every layer; plus the (clips x 192) matrix of the same values."""
    layout = np.random.default_rng(0)
    offsets = layout.normal(0.3, 0.3, (3, 64))
    class_means = layout.standard_normal((4, 1, 64))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), per_class)
    noise = rng.standard_normal((len(labels), 3, 64))
    x = (offsets + 0.05 * (0.15 * class_means[labels] + noise)).astype(np.float32)
    table = ClipArrays(
        "pooled", [f"/c/{seed}/{i:04d}.wav" for i in range(len(labels))],
        np.arange(len(labels)) % 8 + 1, [CLASSES_4[c] for c in labels], labels, list(x),
    )  # fmt: skip
    return table, x.reshape(len(x), -1)


def test_a_probe_head_trained_by_our_loop_matches_logistic_regression():
    """The head our loop trains on frozen pooled features (the default settings, probe mode)
    is no worse than a plain LogisticRegression on the same features: it cannot underfit
    them unnoticed (issue 23: before the head's input was standardised it scored 36 points
    below)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (train, x_train), (val, _), (test, x_test) = (
        pooled_clips(60, 1),
        pooled_clips(15, 2),
        pooled_clips(60, 3),
    )
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    reference.fit(x_train, train.labels)
    reference_ua = balanced_accuracy_score(test.labels, reference.predict(x_test))
    cfg = TrainConfig(model=RANDOM_DEMO_MODEL, probe=True)
    seed_everything(cfg.seed)
    model, fe = build_model(cfg, CLASSES_4)
    run_training(cfg, model, fe, train, val)
    metrics, _, _ = evaluate(model, test, batch_size=64, device=CPU, num_classes=4)
    assert 0.5 < reference_ua < 0.9  # a task the features hold, not a trivial one
    assert metrics["val/uar"] >= reference_ua - 0.05


def test_the_head_warm_up_trains_the_head_alone_to_a_linear_probes_fit():
    """LP-FT's first stage: on the training clips' pooled states under the initial encoder,
    the head alone reaches what LogisticRegression reaches on them, the encoder is untouched,
    and the fine-tuning's random stream is left as it was (the warm-up draws its own)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (train, x_train), (test, x_test) = pooled_clips(60, 1), pooled_clips(60, 3)
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    reference_ua = balanced_accuracy_score(
        test.labels, reference.fit(x_train, train.labels).predict(x_test)
    )
    cfg = TrainConfig(model=RANDOM_DEMO_MODEL, head_warmup_epochs=20)
    seed_everything(cfg.seed)
    model, _ = build_model(cfg, CLASSES_4)
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    pooled, labels = standardize_head(model, train, batch_size=64, device=CPU, keep_pooled=True)
    assert pooled.shape == (240, 3, 64) and labels.tolist() == train.labels.tolist()
    before = metrics_of(model, test)
    rng = torch.get_rng_state()
    losses = warm_up_head(model, pooled, labels, cfg, CPU)
    assert torch.equal(torch.get_rng_state(), rng)
    assert losses["head_warmup/last_loss"] < 0.5 * losses["head_warmup/first_loss"]
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.items())
    after = metrics_of(model, test)
    assert 0.5 < reference_ua < 0.9 and before["val/uar"] < 0.4  # random head: near chance
    assert after["val/uar"] >= reference_ua - 0.05


def metrics_of(model, clips) -> dict[str, float]:
    metrics, _, _ = evaluate(model, clips, batch_size=64, device=CPU, num_classes=4)
    return metrics


def test_fine_tuning_starts_from_the_warmed_up_head_and_a_resumed_run_keeps_it(
    clips, tmp_path, monkeypatch
):
    """run_training with head_warmup_epochs: the head is warmed up before the first step
    (only the head moves), and a run resumed from a checkpoint does not warm it up again
    (its head is in the checkpoint): it ends with the weights of an unbroken run."""
    cfg = tiny_config(epochs=2, head_warmup_epochs=3)
    seed_everything(cfg.seed)
    model, fe = build_model(cfg, CLASSES)
    q = model.encoder.encoder.layers[0].attention.q_proj.weight.detach().clone()
    head = model.model.classifier.weight.detach().clone()
    first: dict[str, torch.Tensor] = {}

    def at_first_epoch(metrics, write):
        if metrics["epoch"] == 1:
            write(tmp_path / "epoch_1")

    import ser_ray.training.finetune as finetune

    real_step = finetune.train_one_epoch

    def spy(engine, batches, cfg_, **kw):
        if not first:  # the weights fine-tuning starts from
            first["q"] = engine.model.encoder.encoder.layers[0].attention.q_proj.weight.clone()
            first["head"] = engine.model.model.classifier.weight.detach().clone()
        return real_step(engine, batches, cfg_, **kw)

    monkeypatch.setattr(finetune, "train_one_epoch", spy)
    run_training(cfg, model, fe, clips, None, on_epoch_end=at_first_epoch)
    monkeypatch.undo()
    assert torch.equal(first["q"], q) and not torch.equal(first["head"], head)
    seed_everything(cfg.seed)
    resumed, fe2 = build_model(cfg, CLASSES)
    run_training(cfg, resumed, fe2, clips, None, resume_from=tmp_path / "epoch_1")
    for name, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_refit_trains_a_fresh_model_on_fit_and_validation_clips():
    fe = demo_feature_extractor()
    fit = table_from_arrow(synthetic_table(1, seed=1), "waveform", LABELS, fe)
    val = table_from_arrow(synthetic_table(1, seed=2), "waveform", LABELS, fe)
    val.speakers[:] = 24  # validation speakers of their own
    cfg = tiny_config(epochs=5, refit=True, early_stopping_patience=2)
    model, table = refit(cfg, 2, fit, val, CLASSES)
    assert len(table) == len(fit) + len(val) and table.paths == sorted(table.paths)
    assert set(table.speakers.tolist()) == set(fit.speakers.tolist()) | {24}
    assert sorted(zip(table.paths, table.labels.tolist(), strict=True)) == sorted(
        zip(fit.paths + val.paths, [*fit.labels.tolist(), *val.labels.tolist()], strict=True)
    )
    # the same as training from scratch on all clips for the chosen 2 epochs, seeded
    again, _ = refit(cfg, 2, fit, val, CLASSES)
    fresh_cfg = dataclasses.replace(cfg, epochs=2, early_stopping_patience=None)
    seed_everything(cfg.seed)
    fresh, fresh_fe = build_model(fresh_cfg, CLASSES)
    outcome = run_training(fresh_cfg, fresh, fresh_fe, table, None)
    assert [h["epoch"] for h in outcome.state.history] == [1, 2]
    for name, value in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
        assert torch.equal(again.state_dict()[name], value), name


def test_a_wavlm_encoder_trains_and_saves_a_wavlm_checkpoint(encoders, tmp_path):
    """``--model <WavLM folder>`` trains WavLM (not wav2vec2 with random weights) and saves a
    ``wavlm`` checkpoint whose frozen CNN is the given one."""
    from safetensors.torch import load_file

    from ser_ray.models.ssl import save_model

    folder = encoders["wavlm-base-plus"]
    cfg = tiny_config(model=str(folder), epochs=1)
    model, fe = build_model(cfg, CLASSES)
    assert fe.return_attention_mask and model.use_attention_mask
    table = table_from_arrow(synthetic_table(1), "waveform", LABELS, fe)
    run_training(cfg, model, fe, table, None)
    save_model(model.model, fe, tmp_path / "best_model")
    saved = load_file(str(tmp_path / "best_model" / "model.safetensors"))
    given = load_file(str(folder / "model.safetensors"))
    cnn = [k for k in given if k.startswith("feature_extractor.")]
    assert cnn and all(torch.equal(saved[f"wavlm.{k}"], given[k]) for k in cnn)
    moved = "encoder.layers.0.attention.q_proj.weight"
    assert not torch.equal(saved[f"wavlm.{moved}"], given[moved])  # the transformer trained
    config = json.loads((tmp_path / "best_model" / "config.json").read_text())
    assert config["model_type"] == "wavlm"
    assert config["architectures"] == ["WavLMForSequenceClassification"]


def _fold_rows(features_dir: Path) -> dict[str, int]:
    """Rows of a fold's Ray datasets and of a TAPT pool dataset, read to the end."""
    from ser_ray.distributed.ingest import fold_datasets, parquet_dataset

    datasets = fold_datasets(features_dir, {"train": [3, 9], "test": [4]}, "waveform")
    datasets["pool"] = parquet_dataset(features_dir, ["path", "waveform"], [1, 2, 3])
    return {
        name: sum(t.num_rows for t in ds.iter_batches(batch_format="pyarrow"))
        for name, ds in datasets.items()
    }


def test_feature_cache_and_fold_datasets_read_while_every_cpu_is_held(demo_features, tmp_path):
    """Placement groups a killed trainer left behind (seen after an out-of-memory kill during
    TAPT) held the CPUs that the cache's Parquet reads and model actors asked for: the main
    job waited for ever before fine-tuning. Now they reserve none on CPU, nor do the reads
    of a fold's datasets or a TAPT pool (Ray's Parquet readers sample files in 1-CPU tasks)."""
    import concurrent.futures

    import pyarrow.parquet as pq
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from ser_ray.distributed.feature_cache import build_feature_cache
    from ser_ray.features.featurize import load_features

    held = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(held.ready(), timeout=60)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    building = pool.submit(
        build_feature_cache,
        demo_features / "features",
        tmp_path / "cache",
        train_config=tiny_config(use_feature_cache=True),
        num_actors=2,  # on Ray Data, as a corpus above the in-process size
    )
    try:
        cache = building.result(timeout=300)  # before the fix: waits for ever
        rows = pool.submit(_fold_rows, demo_features / "features").result(timeout=120)
    finally:
        remove_placement_group(held)  # lets a stuck build finish, so the thread can end
        pool.shutdown(wait=True)
    assert rows == {"train": 2 * 16, "test": 16, "pool": 3 * 16}
    rows = pq.ParquetDataset(cache.path).read(columns=["path", "feature_rows"])
    assert cache.num_clips == rows.num_rows == len(load_features(demo_features / "features"))
    assert min(rows.column("feature_rows").to_pylist()) > 0


def test_the_feature_cache_is_the_same_whatever_the_number_of_actors(
    demo_features, tmp_path, monkeypatch
):
    """The cache runs one actor per CPU; its files, read in the order the folds read them,
    hold the same rows in the same order, bit for bit, as a cache built by one actor, and as
    one built without Ray by a small corpus's driver (the folds' batches follow that order,
    and every actor, and the driver meanwhile, computes on one thread)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ser_ray.common.storage import parquet_files
    from ser_ray.distributed import feature_cache
    from ser_ray.features.featurize import load_features

    n_clips = len(load_features(demo_features / "features"))

    def read(actors: int | None) -> tuple[pa.Table, list[str]]:
        cache = feature_cache.build_feature_cache(
            demo_features / "features",
            tmp_path / f"cache_{actors}",
            train_config=tiny_config(use_feature_cache=True),
            num_actors=actors,
            batch_size=4,  # 12 batches: both actors get work
        )
        filesystem, files = parquet_files(cache.path)
        table = pa.concat_tables(pq.read_table(f, filesystem=filesystem) for f in files)
        return table, [Path(f).name for f in files]

    (one, _), (two, _) = read(1), read(2)
    monkeypatch.setattr(feature_cache, "IN_PROCESS_MAX_CLIPS", n_clips)  # a small corpus
    driver, driver_files = read(None)
    assert driver_files == ["part-0.parquet"]  # written here, not by Ray Data's writers
    assert one.num_rows == n_clips > 0
    assert one.equals(two) and one.equals(driver)
    assert not list((tmp_path / "cache_None").glob("*/model"))  # the staged model is gone


def test_a_feature_cache_is_never_reused_for_other_clips(demo_features, tmp_path):
    """A run folder's cache is named by the encoder and by the clips: another corpus prepared
    into the same folder (or other clips in a folder without a fingerprint) gets its own."""
    import json

    import pyarrow.parquet as pq

    from ser_ray.distributed.feature_cache import clips_digest

    features = demo_features / "features"
    fingerprint = json.loads((demo_features / "config.json").read_text())["fingerprint"]
    assert clips_digest(features) == fingerprint[:12]
    table = pq.ParquetDataset(features).read(columns=["path", "actor"])
    for name, rows in (("all", table), ("again", table), ("fewer", table.slice(1))):
        (tmp_path / name).mkdir()
        pq.write_table(rows, tmp_path / name / "part-0.parquet")
    digests = {name: clips_digest(tmp_path / name) for name in ("all", "again", "fewer")}
    assert digests["all"] == digests["again"] != digests["fewer"]
