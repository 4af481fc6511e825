"""Predictions for new audio from saved fold models (mean of their probabilities)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.corpus.ravdess import class_names
from ser_ray.models.ssl import RANDOM_DEMO_MODEL, load_model, save_model
from ser_ray.predict import load_fold_models, model_probabilities, predict_files

ROOT = Path(__file__).resolve().parent.parent
CLASSES = class_names()
RAVDESS = ravdess_protocol()


@pytest.fixture(scope="module")
def fold_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for seed in (0, 1):
        model, fe = load_model(RANDOM_DEMO_MODEL, CLASSES, seed=seed)
        torch.manual_seed(seed)
        with torch.no_grad():  # a head with visible preferences
            model.classifier.weight.normal_(0, 1.0)
        dirs.append(save_model(model, fe, root / f"fold_{seed + 1}" / "model"))
    return dirs


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    t48 = np.arange(48_000) / 48_000
    sf.write(root / "a.wav", 0.3 * np.sin(2 * np.pi * 220 * t48), 48_000)
    stereo = 0.2 * rng.standard_normal((33_075, 2))  # 1.5 s at 22.05 kHz, stereo
    sf.write(root / "b.flac", stereo, 22_050)
    (root / "broken.wav").write_bytes(b"RIFF....WAVEfmt not really")
    return [str(root / "a.wav"), str(root / "b.flac"), str(root / "broken.wav")]


def test_predict_files_averages_fold_models(fold_models, audio_files):
    from ser_ray.features.audio import load_audio

    frame, rejected = predict_files(fold_models, audio_files)
    assert frame["path"].tolist() == audio_files[:2]
    assert rejected["path"].tolist() == [audio_files[2]] and rejected["reason"].iloc[0]
    probs = frame[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert (frame["n_models"] == 2).all()
    models, names = load_fold_models(fold_models)
    assert names == CLASSES
    waves = [load_audio(p) for p in audio_files[:2]]
    assert len(waves[1]) == 24_000  # resampled to 16 kHz
    each = [model_probabilities(m, fe, waves) for m, fe in models]
    np.testing.assert_allclose(probs, (each[0] + each[1]) / 2, atol=1e-12)
    assert not np.allclose(each[0], each[1])  # two different models
    assert frame["pred_label"].tolist() == [CLASSES[i] for i in probs.argmax(axis=1)]


def test_models_with_other_classes_are_refused(fold_models, tmp_path):
    model, fe = load_model(RANDOM_DEMO_MODEL, class_names(merge_calm=True))
    other = save_model(model, fe, tmp_path / "seven")
    with pytest.raises(ValueError, match="predicts"):
        load_fold_models([fold_models[0], other])


@pytest.mark.slow
@pytest.mark.e2e
def test_predict_job_smoke_test(tmp_path):
    done = subprocess.run(
        [sys.executable, "jobs/predict.py", "--smoke-test", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    frame = pd.read_csv(tmp_path / "predictions.csv")
    assert len(frame) == 2 and (frame["n_models"] == 1).all()
    np.testing.assert_allclose(frame.filter(like="prob_").sum(axis=1), 1.0, atol=1e-6)
    assert "2 clips predicted by 1 model(s)" in done.stdout


def test_speaker_normalised_svm_predicts_new_files_as_in_training(demo_features, tmp_path):
    """A saved svm+spknorm fold model on one speaker's files (--one-speaker) gives the same
    probabilities as on that speaker's prepared features; single clips and unknown speakers
    are refused."""
    from ser_ray.features import featurize
    from ser_ray.models import svm, svm_model

    df = featurize.load_features(
        demo_features / "features", ["path", "actor", "emotion", "mfcc_stats", "egemaps"]
    )
    X = svm.feature_set_matrix(df, "mfcc+egemaps", speaker_normalise=True)
    train = (df["actor"] > 4).to_numpy()
    model = svm.fit_calibrated_svm(
        svm.REFERENCE_PARAMS,
        X[train],
        svm.label_vector(df, RAVDESS)[train],
        df["actor"][train].tolist(),
        RAVDESS.fold_of_speaker(),
    )
    saved = svm_model.save_fold_model(
        tmp_path / "fold_1.joblib",
        svm_model.FoldModel(
            model, "svm+mfcc+egemaps+spknorm", "mfcc+egemaps", True, CLASSES, fold=1, params={}
        ),
    )
    speaker1 = (df["actor"] == 1).to_numpy()
    expected = svm.class_probabilities(model, X[speaker1], len(CLASSES))
    files = df["path"][speaker1].tolist()
    out = tmp_path / "pred"
    job = [sys.executable, "jobs/predict.py", "--svm-models", str(saved), "--out", str(out)]
    subprocess.run([*job, "--one-speaker", *files], cwd=ROOT, check=True, capture_output=True)
    got = pd.read_csv(out / "predictions.csv").set_index("path").loc[files]
    np.testing.assert_allclose(got[[f"prob_{c}" for c in CLASSES]], expected, atol=1e-4)

    speakers = tmp_path / "speakers.csv"
    speakers.write_text("path,speaker\n" + "".join(f"{Path(f).name},a\n" for f in files[:-1]))
    done = subprocess.run([*job, "--speaker-of", str(speakers), *files], cwd=ROOT, text=True,
                          capture_output=True)  # fmt: skip
    assert done.returncode == 2 and "1 clip(s) have no speaker" in done.stderr
    assert Path(files[-1]).name in done.stderr
    done = subprocess.run([*job, "--one-speaker", files[0]], cwd=ROOT, text=True,
                          capture_output=True)  # fmt: skip
    assert done.returncode == 2 and "has a single clip" in done.stderr


def _svm_fold_models(n_features: int) -> list:
    """Two fold models of random weights (mfcc features), one per fold: what a run saves."""
    from sklearn.linear_model import LogisticRegression

    from ser_ray.models import svm_model

    folds = []
    for fold in (1, 2):
        rng = np.random.default_rng(fold)
        X, y = rng.standard_normal((5 * len(CLASSES), n_features)), np.arange(40) % len(CLASSES)
        model = LogisticRegression(max_iter=200).fit(X, y)
        folds.append(svm_model.FoldModel(model, "svm", "mfcc", False, CLASSES, fold, {}))
    return folds


def test_svm_fold_models_from_an_s3_run_location(audio_files, tmp_path, s3_location):
    """SVM fold models saved to an ``s3://`` run location are the bytes a local run saves;
    predict reads them there (a quoted wildcard matched in the bucket), in-process and as
    ``jobs/predict.py --out s3://…``, with the probabilities of the local copies."""
    from ser_ray.common import storage
    from ser_ray.features.audio import load_audio
    from ser_ray.models import svm_model
    from ser_ray.predict import expand_locations, predict_files_svm

    n_features = len(svm_model.svm_feature_columns(load_audio(audio_files[0]))["mfcc_stats"])
    local, remote = [], []
    for fold_model in _svm_fold_models(n_features):
        name = f"fold_{fold_model.fold}.joblib"
        local.append(svm_model.save_fold_model(tmp_path / "svm_models" / "svm" / name, fold_model))
        remote.append(
            svm_model.save_fold_model(
                storage.join(s3_location, "svm_models", "svm", name), fold_model
            )
        )
    assert [storage.read_bytes(r) for r in remote] == [Path(p).read_bytes() for p in local]
    back = svm_model.load_fold_model(remote[1])
    assert (back.fold, back.class_names, back.variant) == (2, CLASSES, "svm")

    pattern = f"{s3_location}/svm_models/svm/fold_*.joblib"
    assert expand_locations([pattern, local[0]]) == [*remote, local[0]]
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        expand_locations([f"{s3_location}/svm_models/svm/fold_*.pkl"])
    expected, _ = predict_files_svm(local, audio_files)
    got, rejected = predict_files_svm(remote, audio_files)
    pd.testing.assert_frame_equal(got, expected)
    assert rejected["path"].tolist() == [audio_files[2]]

    out = storage.join(s3_location, "predict")
    job = [sys.executable, "jobs/predict.py", "--svm-models", pattern, "--out", out]
    done = subprocess.run([*job, *audio_files], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    frame = pd.read_csv(io.StringIO(storage.read_text(storage.join(out, "predictions.csv"))))
    columns = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(frame[columns], expected[columns], atol=1e-6)
    assert json.loads(storage.read_text(storage.join(out, "config.json")))["models"] == remote
    assert storage.exists(storage.join(out, "rejected.csv"))


def test_ssl_fold_models_from_an_s3_run_location(
    fold_models, audio_files, s3_location, tmp_path, monkeypatch
):
    """Fine-tuned fold model folders in an ``s3://`` run location (``fold_*/model``, matched
    in the bucket) predict as their local copies."""
    from ser_ray.common import storage
    from ser_ray.predict import expand_locations

    monkeypatch.setenv("SER_RAY_CACHE", str(tmp_path / "cache"))  # this node's copies
    for folder in fold_models:
        storage.upload(folder, storage.join(s3_location, "wav2vec2", folder.parent.name, "model"))
    remote = expand_locations([f"{s3_location}/wav2vec2/fold_*/model"])
    assert len(remote) == 2
    expected, _ = predict_files(fold_models, audio_files[:2])
    got, _ = predict_files(remote, audio_files[:2])
    pd.testing.assert_frame_equal(got, expected)
