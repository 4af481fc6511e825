"""A user's mistake ends a job with one ``error:`` line on stderr and exit status 2 (no
traceback); ``--verbose`` shows the traceback. Each job's ``main`` runs here in-process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ser_ray.common.errors import UserError

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def job(name: str):
    """The module of ``jobs/<name>.py`` (jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_error_line(capsys, name: str, argv: list[str]) -> str:
    """Run the job; check it exits 2 with a single ``error:`` line and no traceback; the line."""
    assert job(name).main(argv) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_a_corpus_folder_that_is_not_there(capsys, tmp_path):
    line = one_error_line(
        capsys, "prepare", ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
    )
    assert f"--data-dir {tmp_path / 'nowhere'}: not a folder" in line


def test_egemaps_without_opensmile_names_the_extra(capsys, tmp_path, monkeypatch, demo_corpus):
    from ser_ray.features import audio

    monkeypatch.setitem(sys.modules, "opensmile", None)  # import opensmile -> ImportError
    audio._egemaps_smile.cache_clear()
    try:
        line = one_error_line(
            capsys, "prepare", ["--data-dir", str(demo_corpus), "--out", str(tmp_path)]
        )
    finally:
        audio._egemaps_smile.cache_clear()
    assert "eGeMAPS needs the opensmile package" in line and ".[egemaps]" in line
    assert not (tmp_path / "features").exists()  # refused before any clip was read


def test_a_manifest_without_labels(capsys, tmp_path, ray_local):
    manifest = tmp_path / "clips.csv"
    manifest.write_text("path,speaker\na.wav,s1\n")
    argv = ["--manifest", str(manifest), "--model", "demo", "--out", str(tmp_path / "run")]
    line = one_error_line(capsys, "kfold", argv)
    assert str(manifest) in line and "emotion" in line


def test_features_that_were_never_prepared(capsys, tmp_path, ray_local):
    argv = ["--features", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]
    line = one_error_line(capsys, "tune_svm", argv)
    assert "no finished features here" in line and "jobs/prepare.py" in line


def test_a_model_folder_that_is_not_a_saved_model(capsys, tmp_path):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"")
    argv = ["--models", str(tmp_path), "--out", str(tmp_path / "out"), str(clip)]
    line = one_error_line(capsys, "predict", argv)
    assert f"{tmp_path}: not a saved model (no config.json)" in line


def test_verbose_shows_the_traceback(tmp_path):
    argv = ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--verbose"]
    with pytest.raises(UserError, match="not a folder"):
        job("prepare").main(argv)


def test_a_corpus_without_model_offline_names_the_fix(capsys, tmp_path, monkeypatch, ray_local):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is out of reach here anyway
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    line = one_error_line(capsys, "kfold", ["--data-dir", str(corpus), "--out", str(tmp_path)])
    assert "--model 'facebook/wav2vec2-base': no local folder" in line
    assert "--model demo offline" in line


def test_an_encoder_of_another_family_than_the_variants(capsys, tmp_path, encoders, ray_local):
    wavlm = str(encoders["wavlm-base-plus"])
    line = one_error_line(capsys, "kfold", ["--model", wavlm, "--out", str(tmp_path / "run")])
    assert f"the wav2vec2 variants would run {wavlm!r}, a wavlm encoder" in line
    assert "--model wav2vec2=" in line
    assert not (tmp_path / "run" / "prepared").exists()  # refused before any work
