"""The study on corpora that are not RAVDESS-shaped: a CSV manifest of espeak-ng speech and a
CREMA-D-named folder, end to end (features, protocol, SVMs, wav2vec2, summary)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ser_ray.corpus.protocol import Protocol, ProtocolSettings
from ser_ray.corpus.ravdess import parse_name
from ser_ray.features.speaker_norm import SpeakerNormError
from ser_ray.models.ssl import load_model, takes_speaker_normalised_layers
from ser_ray.predict import predict_files, predict_files_svm
from ser_ray.study.config import KFoldConfig, study_train_config
from ser_ray.study.kfold import run_kfold

pytestmark = pytest.mark.usefixtures("ray_local")

#: RAVDESS emotion -> CREMA-D code (calm and surprised have none).
CREMAD_CODES = {
    "neutral": "NEU",
    "happy": "HAP",
    "sad": "SAD",
    "angry": "ANG",
    "fearful": "FEA",
    "disgust": "DIS",
}
#: The cross-corpus test's variants: an SVM, a fine-tuned and a speaker-normalised probe, an
#: SVM on the same encoder's speaker-normalised pooled layers.
VARIANTS_ACROSS = ("svm", "wav2vec2", "wav2vec2+probe+spknorm", "svm+ssl+spknorm")
SENTENCES = ["DFA", "IEO", "IOM", "ITH", "ITS", "IWL", "IWW", "MTI", "TAI", "TIE", "TSI", "WSI"]


def _espeak_manifest(tts_corpus: Path, out: Path) -> Path:
    """A CSV manifest (relative paths) of 10 espeak-ng voices named ``voice-XX``, 5 labels."""
    keep = {"neutral", "calm", "happy", "sad", "angry"}
    out.parent.mkdir(parents=True)
    rows = []
    for wav in sorted(tts_corpus.glob("Actor_*/*.wav")):
        name = parse_name(wav.name)
        if name.actor <= 10 and name.emotion in keep:
            rows.append(
                {
                    "path": os.path.relpath(wav, out.parent),
                    "speaker": f"voice-{name.actor:02d}",
                    "emotion": name.emotion,
                    "gender": "M" if name.actor % 2 else "F",
                    "statement": name.statement,
                }
            )
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_a_csv_manifest_of_espeak_speech_with_its_own_labels(tts_corpus, tmp_path):
    """10 speakers, 4 classes (calm dropped by the label map), 5 speaker-disjoint folds."""
    manifest = _espeak_manifest(tts_corpus, tmp_path / "corpus" / "clips.csv")
    run = tmp_path / "run"
    cfg = KFoldConfig(
        manifest=str(manifest),
        variants=("svm", "svm+spknorm"),
        protocol=ProtocolSettings(num_folds=5, label_map="calm=-"),
        train=study_train_config(n_val_speakers=2),
        smoke_test=True,
        out=str(run),
    )
    summary = run_kfold(cfg)

    assert summary["classes"] == ["angry", "happy", "neutral", "sad"]
    assert summary["fold_scheme"] == "speaker-kfold" and len(summary["folds"]) == 5
    assert summary["label_map"]["calm"] is None
    protocol = Protocol.load(run / "protocol.json")
    doc = json.loads((run / "protocol.json").read_text())
    test_speakers = [s for fold in doc["folds"] for s in fold["test_speakers"]]
    assert sorted(test_speakers) == [f"voice-{a:02d}" for a in range(1, 11)]  # each once
    for fold, row in zip(doc["folds"], summary["folds"], strict=True):
        assert row["test_speakers"] == fold["test_speakers"]
        # one male (odd voice) and one female (even voice) per fold
        assert sorted(int(s[-2:]) % 2 for s in fold["test_speakers"]) == [0, 1]
        assert not set(fold["test_speakers"]) & set(
            fold["fit_speakers"] + fold["validation_speakers"]
        )
        assert row["n_test"] == 2 * 28  # 4 neutral + 3 x 8 clips per speaker
    predictions = pd.read_csv(run / "predictions.csv")
    assert [c for c in predictions.columns if c.startswith("prob_")] == [
        f"prob_{c}" for c in summary["classes"]
    ]
    assert len(predictions) == 2 * 280 and "calm" not in set(predictions["true_label"])
    for _, row in predictions.iterrows():  # out of fold: the model never saw the speaker
        assert row["actor"] in protocol.folds[row["fold"] - 1]
    rejected = pd.read_csv(run / "rejected.csv")
    assert len(rejected) == 10 * 8  # every calm clip, with the reason
    assert (rejected["reason"] == "label calm left out by the label map").all()
    assert summary["mean"]["svm+spknorm"]["uar"] > 0.4  # chance: 0.25
    assert "| fold | test speakers | n |" in (run / "summary.md").read_text()
    assert "label map: calm -> left out" in (run / "summary.md").read_text()


def _cremad_corpus(demo_corpus: Path, out: Path, speakers: range) -> Path:
    """Some of the demo corpus's actors renamed CREMA-D style (actor a -> speaker 1000 + a,
    6 emotions), plus a file whose name does not parse."""
    out.mkdir(parents=True)
    counts: dict[tuple[int, str], int] = {}
    for wav in sorted(demo_corpus.glob("Actor_*/*.wav")):
        name = parse_name(wav.name)
        if name.actor not in speakers or name.emotion not in CREMAD_CODES:
            continue
        n = counts[name.actor, name.emotion] = counts.get((name.actor, name.emotion), -1) + 1
        new = f"{1000 + name.actor}_{SENTENCES[n]}_{CREMAD_CODES[name.emotion]}_XX.wav"
        shutil.copy(wav, out / new)
    (out / "1999_XXX_ANG.wav").write_bytes(b"")  # not a CREMA-D name: rejected, with why
    return out


def test_a_cremad_named_folder(demo_corpus, tmp_path):
    corpus = _cremad_corpus(demo_corpus, tmp_path / "cremad", speakers=range(1, 9))
    run = tmp_path / "run"
    cfg = KFoldConfig(
        data_dir=str(corpus),
        variants=("svm",),
        protocol=ProtocolSettings(num_folds=4, n_val_speakers=1),
        train=study_train_config(n_val_speakers=1),
        smoke_test=True,
        out=str(run),
    )
    summary = run_kfold(cfg)

    assert summary["classes"] == ["angry", "disgust", "fearful", "happy", "neutral", "sad"]
    assert summary["fold_scheme"] == "speaker-kfold" and len(summary["folds"]) == 4
    protocol = Protocol.load(run / "protocol.json")
    assert protocol.speakers == {a: str(a) for a in range(1001, 1009)}
    for row in summary["folds"]:
        test, fit, val = protocol.split(row["fold"])
        assert row["test_actors"] == test and "test_speakers" not in row  # names = numbers
        assert len(test) == 2 and len(val) == 1 and not set(test) & set(fit + val)
        assert row["n_test"] == 2 * 12
    predictions = pd.read_csv(run / "predictions.csv")
    assert predictions["path"].nunique() == len(predictions) == 96
    rejected = pd.read_csv(run / "rejected.csv")
    assert rejected["path"].map(lambda p: Path(p).name).tolist() == ["1999_XXX_ANG.wav"]
    assert "SSSS_SEN_EMO_LVL" in rejected["reason"].iloc[0]


def test_cross_corpus_ravdess_layout_to_cremad(demo_corpus, tmp_path):
    """Trained on 8 RAVDESS-named actors (4 classes kept), each fold model of the SVM, of
    wav2vec2, of its speaker-normalised probe and of the SVM on its speaker-normalised pooled
    layers is tested on 8 other speakers named CREMA-D style (6 labels, 4 shared)."""
    study = tmp_path / "ravdess"
    for wav in demo_corpus.glob("Actor_0[1-8]/*.wav"):
        (study / wav.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(wav, study / wav.parent.name / wav.name)
    test = _cremad_corpus(demo_corpus, tmp_path / "cremad", speakers=range(9, 17))
    run = tmp_path / "run"
    cfg = KFoldConfig(
        data_dir=str(study),
        test_data_dir=(str(test),),
        variants=VARIANTS_ACROSS,
        protocol=ProtocolSettings(
            folds="speaker-kfold", num_folds=4, label_map="calm=-,fearful=-,disgust=-,surprised=-"
        ),
        train=study_train_config(model="demo-random", n_val_speakers=1, batch_size=8),
        smoke_test=True,
        out=str(run),
    )
    summary = run_kfold(cfg)

    assert summary["classes"] == ["neutral", "happy", "sad", "angry"]  # RAVDESS's order
    (cross,) = summary["cross_corpus"]
    assert cross["test_corpus"] == "cremad" and cross["classes"] == summary["classes"]
    assert cross["left_out_labels"] == {"disgust": 16, "fearful": 16}  # 8 speakers x 2
    assert cross["n_clips"] == 8 * 8 and cross["n_speakers"] == 8
    for variant in VARIANTS_ACROSS:
        folds = cross["per_fold"][variant]
        assert [f["fold"] for f in folds] == [1, 2, 3, 4]
        assert cross["mean"][variant]["uar"] == pytest.approx(sum(f["uar"] for f in folds) / 4)
    predictions = pd.read_csv(run / "cross_corpus" / "cremad" / "predictions.csv")
    assert len(predictions) == 64 * 4 * 4  # every clip, by every fold model of each variant
    probs = predictions.filter(like="prob_")
    assert list(probs.columns) == [f"prob_{c}" for c in summary["classes"]]
    assert ((probs.sum(axis=1) - 1).abs() < 1e-9).all()
    assert set(predictions["pred_label"]) <= set(summary["classes"])
    assert not set(predictions["speaker"]) & {str(a) for a in range(1, 9)}
    assert "## Cross-corpus" in (run / "summary.md").read_text()
    # the probe's fold models say they take speaker-normalised layers; predict needs speakers
    probe_dir = run / "wav2vec2+probe+spknorm" / "fold_1" / "best_model"
    assert takes_speaker_normalised_layers(load_model(probe_dir)[0])
    assert not takes_speaker_normalised_layers(load_model(run / "wav2vec2/fold_1/best_model")[0])
    clips = sorted(str(p) for p in test.glob("1009_*.wav"))
    with pytest.raises(SpeakerNormError, match="give the speaker of every clip"):
        predict_files([probe_dir], clips)
    alone, _ = predict_files([probe_dir], clips, speakers=dict.fromkeys(clips, "1009"))
    others = sorted(str(p) for p in test.glob("1010_*.wav"))
    both, _ = predict_files(
        [probe_dir], clips + others,
        speakers={**dict.fromkeys(clips, "1009"), **dict.fromkeys(others, "1010")},
    )  # fmt: skip
    pd.testing.assert_frame_equal(alone, both.iloc[: len(clips)])  # its own clips' statistics
    with pytest.raises(SpeakerNormError, match="single clip"):
        predict_files([probe_dir], clips, speakers={**dict.fromkeys(clips, "a"), clips[0]: "b"})
    # svm+ssl's fold models take the pooled layers of the study's encoder: predict computes
    # them from the audio, and gives a test fold's clips what the study gave them
    svm_ssl = run / "svm_models" / "svm+ssl+spknorm" / "fold_1.joblib"
    oof = pd.read_csv(run / "predictions.csv").query("model == 'svm+ssl+spknorm' and fold == 1")
    speakers = dict(zip(oof["path"], oof["actor"].astype(str), strict=True))
    again, _ = predict_files_svm([svm_ssl], oof["path"].tolist(), speakers=speakers)
    np.testing.assert_allclose(
        again.filter(like="prob_").to_numpy(), oof.filter(like="prob_").to_numpy(), atol=1e-5
    )
    with pytest.raises(SpeakerNormError):
        predict_files_svm([svm_ssl], clips)


def test_a_test_corpus_holding_study_files_is_refused_before_any_work(demo_corpus, tmp_path):
    from ser_ray.study import kfold

    def no_features(*args, **kwargs):
        raise AssertionError("features were prepared before the test corpora were checked")

    cfg = KFoldConfig(
        data_dir=str(demo_corpus),
        test_data_dir=(str(demo_corpus),),
        variants=("svm",),
        out=str(tmp_path / "run"),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kfold, "prepare_features", no_features)
        with pytest.raises(ValueError, match="holds 384 files of the study corpus"):
            run_kfold(cfg)


def test_a_single_clip_speaker_stops_speaker_normalised_variants_before_any_work(tmp_path):
    from ser_ray.features.speaker_norm import SpeakerNormError
    from ser_ray.study import kfold

    rows = [["path", "speaker", "emotion"]]
    for s in range(6):
        for i, label in enumerate(["angry", "happy", "angry", "happy"][: 1 if s == 5 else 4]):
            (tmp_path / f"s{s}_{i}.wav").touch()
            rows.append([f"s{s}_{i}.wav", f"spk{s}", label])
    manifest = tmp_path / "clips.csv"
    manifest.write_text("\n".join(",".join(r) for r in rows) + "\n")
    cfg = KFoldConfig(
        manifest=str(manifest),
        variants=("svm", "svm+spknorm"),
        protocol=ProtocolSettings(num_folds=3),
        train=study_train_config(n_val_speakers=1),
        out=str(tmp_path / "run"),
    )

    def no_features(*args, **kwargs):
        raise AssertionError("features were prepared before the speakers were checked")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kfold, "prepare_features", no_features)
        with pytest.raises(SpeakerNormError, match=r"speakers \['spk5'\] have a single clip"):
            run_kfold(cfg)
