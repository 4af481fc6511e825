"""Self-supervised pre-training: crops, masks, learning, exact resume, the checkpoint the
classifier loads, unlabeled pools, the pool streamed window by window."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from ser_ray.corpus import ravdess
from ser_ray.features.unlabeled import (
    UnlabeledClips,
    clips_from_arrow,
    pool_from_audio_folder,
    pool_paths,
    read_pool,
)
from ser_ray.models.ssl import demo_config, load_model
from ser_ray.training.clip_stream import ClipStream
from ser_ray.training.engine import seed_everything
from ser_ray.training.pretrain import (
    MODEL_DIR,
    PretrainConfig,
    build_pretraining_model,
    crop_batch,
    mask_and_negatives,
    run_pretraining,
)

TINY = dict(
    conv_dim=(16,) * 7,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    num_codevector_groups=2,
    num_codevectors_per_group=16,
    codevector_dim=32,
    proj_codevector_dim=32,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
)


@pytest.fixture
def tiny_config_file(tmp_path):
    path = tmp_path / "tiny_config.json"
    demo_config(**TINY).to_json_file(path)
    return str(path)


def tone_clips(n: int = 8, seconds: float = 1.2, seed: int = 0) -> UnlabeledClips:
    """Harmonic tones with pitch glides: structure a model can predict from context."""
    rng = np.random.default_rng(seed)
    waves = []
    for _ in range(n):
        t = np.arange(int(16_000 * seconds * rng.uniform(0.9, 1.1))) / 16_000
        f0 = rng.uniform(100, 250) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
        phase = 2 * np.pi * np.cumsum(f0) / 16_000
        wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * (t * 4 % 1 < 0.7)
        waves.append((wave + 0.01 * rng.standard_normal(t.size)).astype(np.float32))
    return UnlabeledClips([f"/clips/{i:02d}.wav" for i in range(n)], waves)


def tiny_pretrain(config_file: str, **kw) -> PretrainConfig:
    base = dict(
        model=config_file,
        mask_prob=0.5,
        mask_length=3,
        num_negatives=10,
        crop_s=1.0,
        batch_size=4,
        epochs=2,
        lr=2e-3,
        warmup_frac=0.0,
        amp="off",
    )
    base.update(kw)
    return PretrainConfig(**base)


def test_crops_have_the_shortest_clips_length_and_come_from_the_clip():
    rng = np.random.default_rng(0)
    waves = [np.arange(n, dtype=np.float32) for n in (500, 900, 700)]
    batch = crop_batch(waves, max_samples=600, rng=rng)
    assert batch.shape == (3, 500)  # shortest clip (500) < max (600): no padding
    for row, wave in zip(batch.numpy(), waves, strict=True):  # a contiguous piece of its own clip
        start = int(row[0])
        np.testing.assert_array_equal(row, wave[start : start + 500])
    assert crop_batch(waves[1:], max_samples=600, rng=rng).shape == (2, 600)


def test_masks_and_negatives_follow_the_objective(tiny_config_file):
    cfg = tiny_pretrain(tiny_config_file, mask_prob=0.65, mask_length=5, num_negatives=7)
    model, _ = build_pretraining_model(cfg)
    np.random.seed(0)
    mask, negatives = mask_and_negatives(model, 4, 16_000, cfg)
    assert mask.shape == (4, 49) and negatives.shape == (4, 49, 7)
    assert 0.3 < mask.float().mean() < 0.8  # span masking covers a large share of frames
    for b in range(4):  # distractors: other masked frames of the same clip, never itself
        frames = negatives[b][mask[b]] - b * 49
        assert mask[b][frames].all()
        own = torch.nonzero(mask[b]).squeeze(1)[:, None]
        assert not (frames == own).any()
    with pytest.raises(ValueError, match="fewer than two mask spans"):
        mask_and_negatives(model, 2, 2_000, cfg)


@pytest.mark.slow
def test_pretraining_loss_falls_below_chance(tiny_config_file):
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = tiny_pretrain(tiny_config_file, epochs=100, batch_size=8, lr=5e-3)
    model, fe = build_pretraining_model(cfg)
    outcome = run_pretraining(cfg, model, fe, tone_clips())
    contrastive = [h["pretrain/contrastive"] for h in outcome.history]
    chance = math.log(cfg.num_negatives + 1)  # the right target among 11 candidates
    assert contrastive[0] > chance - 0.1  # starts at chance ...
    assert np.mean(contrastive[-5:]) < chance - 0.3  # ... and learns to tell them apart
    assert all(0 < h["pretrain/codevector_perplexity"] <= 32 for h in outcome.history)


@pytest.mark.slow
def test_resume_is_bit_exact(tiny_config_file, tmp_path):
    cfg = tiny_pretrain(tiny_config_file, epochs=3, grad_accum_steps=2, batch_size=2)
    clips = tone_clips(6)

    def fresh():
        torch.manual_seed(0)
        np.random.seed(0)
        return build_pretraining_model(cfg)

    model, fe = fresh()
    straight = run_pretraining(cfg, model, fe, clips)

    class Crash(RuntimeError):
        pass

    def crash_after_first(metrics, write):
        if metrics["epoch"] == 1:
            write(tmp_path / "ckpt")
            raise Crash

    model_b, fe = fresh()
    with pytest.raises(Crash):
        run_pretraining(cfg, model_b, fe, clips, on_epoch_end=crash_after_first)
    torch.manual_seed(123)  # the checkpoint's RNG states must win over whatever came after
    np.random.seed(123)
    model_c, fe = fresh()
    resumed = run_pretraining(cfg, model_c, fe, clips, resume_from=tmp_path / "ckpt")
    assert resumed.step == straight.step == 3 * 2  # 6 clips / 2 per batch / 2 per step, 3 ep.

    def curve(history):  # everything but the timings
        return [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history]

    assert curve(resumed.history) == curve(straight.history)  # the loss curve, bit for bit
    for (name, a), b in zip(model.state_dict().items(), model_c.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def pool_stream(clips: UnlabeledClips, window_clips: int, to_clips=clips_from_arrow):
    """``clips`` as a stream of pool rows in a scrambled (fixed) order, 2 rows per read."""
    rows = pa.table({"path": clips.paths, "waveform": clips.waveforms})
    rows = rows.take(np.random.default_rng(5).permutation(rows.num_rows))

    def open_tables():
        return (rows.slice(i, 2) for i in range(0, rows.num_rows, 2))

    return ClipStream(open_tables, to_clips, rows.num_rows, window_clips)


def _fresh(cfg: PretrainConfig):
    torch.manual_seed(0)
    np.random.seed(0)
    return build_pretraining_model(cfg)


def _curve(history):  # everything but the timings
    return [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history]


def test_streamed_pool_with_a_window_covering_it_pretrains_as_in_memory(tiny_config_file):
    cfg = tiny_pretrain(tiny_config_file, epochs=2, grad_accum_steps=2, batch_size=2)
    clips = tone_clips(7)
    runs = []
    for source in (clips, pool_stream(clips, window_clips=7)):
        model, fe = _fresh(cfg)
        runs.append((run_pretraining(cfg, model, fe, source), model.state_dict()))
    (memory, w_memory), (streamed, w_streamed) = runs
    assert streamed.step == memory.step == 2 * 2  # 7 clips: 3 batches of 2, 2 steps an epoch
    assert _curve(streamed.history) == _curve(memory.history)
    for name, tensor in w_memory.items():
        assert torch.equal(w_streamed[name], tensor), name


def test_small_windows_hold_one_window_and_pretrain_on_every_clip(tiny_config_file):
    cfg = tiny_pretrain(tiny_config_file, epochs=1, batch_size=2)
    clips = tone_clips(10)
    alive, peak, seen = [0], [0], []  # clips of windows still referenced; the most at once

    def release(n: int) -> None:
        alive[0] -= n

    def counted(rows: pa.Table) -> UnlabeledClips:
        window = clips_from_arrow(rows)
        alive[0] += len(window)
        peak[0] = max(peak[0], alive[0])
        seen.extend(window.paths)
        weakref.finalize(window, release, len(window))
        return window

    model, fe = _fresh(cfg)
    outcome = run_pretraining(cfg, model, fe, pool_stream(clips, 4, counted))
    assert peak[0] == 4  # one full window, never two at once
    assert sorted(seen) == clips.paths  # every clip once (windows of 4, 4, 2)
    assert outcome.step == 2 + 2 + 1  # each window's batches, steps known before reading
    [epoch] = outcome.history
    assert epoch["step"] == 5 and epoch["pretrain/loss"] > 0


def test_pretrained_checkpoint_loads_into_the_classifier(tiny_config_file, tmp_path):
    cfg = tiny_pretrain(tiny_config_file, epochs=1)
    model, fe = build_pretraining_model(cfg)
    outcome = run_pretraining(cfg, model, fe, tone_clips(4))
    outcome.write_checkpoint(tmp_path)
    saved = load_file(str(tmp_path / MODEL_DIR / "model.safetensors"))
    encoder = {k: v for k, v in saved.items() if k.startswith("wav2vec2.")}
    assert any(k.startswith("quantizer.") for k in saved)  # TAPT can continue from it
    classifier, fe2 = load_model(tmp_path / MODEL_DIR, ravdess.class_names(), seed=0)
    state = classifier.state_dict()
    assert len(encoder) > 20
    for name, tensor in encoder.items():  # every encoder weight transferred, exactly
        assert torch.equal(state[name], tensor), name
    assert fe2.do_normalize and fe2.sampling_rate == 16_000
    # continued pre-training (TAPT) starts from the same weights, quantizer included
    again, _ = build_pretraining_model(PretrainConfig(model=str(tmp_path / MODEL_DIR)))
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_pools_from_an_audio_folder_and_by_speaker(tmp_path, demo_features):
    import soundfile as sf

    folder = tmp_path / "any_names"
    (folder / "sub").mkdir(parents=True)
    sf.write(folder / "a.wav", np.zeros(48_000, np.float32) + 0.1, 48_000)
    sf.write(folder / "sub" / "b.flac", np.zeros(8_000, np.float32) + 0.1, 8_000)
    (folder / "broken.wav").write_bytes(b"RIFF....not audio")
    pool = pool_from_audio_folder(folder, tmp_path / "pool")
    clips = read_pool(pool)
    assert [p.split("/")[-1] for p in clips.paths] == ["a.wav", "b.flac"]
    assert list(clips.lengths) == [16_000, 16_000]  # resampled to 16 kHz
    assert "broken.wav" in (pool / "rejected.csv").read_text()
    chosen = read_pool(demo_features / "features", speakers=[3, 7])
    assert len(chosen) == 2 * 16
    assert {int(p.split("-")[-1][:2]) for p in chosen.paths} == {3, 7}
    with pytest.raises(ValueError, match="no 'actor' column"):
        read_pool(pool, speakers=[1])


def test_tapt_on_ray_train_reads_only_the_folds_training_speakers(
    ray_local, demo_features, tiny_config_file, tmp_path
):
    from ser_ray.corpus.protocol import ravdess_protocol
    from ser_ray.distributed.pretrain_trainer import fit_pretraining
    from ser_ray.distributed.tapt import tapt_key, tapt_speakers

    features = demo_features / "features"
    protocol = ravdess_protocol()
    for fold in range(1, 7):  # the speakers TAPT may read never include a test speaker
        test_speakers, _ = protocol.test_and_train(fold)
        assert sorted(tapt_speakers(fold, protocol) + test_speakers) == list(range(1, 25))
    speakers = tapt_speakers(2, protocol)
    cfg = tiny_pretrain(tiny_config_file, epochs=1, batch_size=16, freeze_feature_encoder=True)
    reports = []
    model_dir = fit_pretraining(
        features, tmp_path / "tapt", cfg, speakers=speakers, on_report=reports.append
    )
    # every report reached this process as it came: the epoch's, then the closing one
    assert [r.get("epoch") for r in reports] == [1, None] and reports[-1]["final"]
    assert reports[0]["pretrain/loss"] > 0 and "checkpoint_path" in reports[0]
    read = (tmp_path / "tapt" / "clips.csv").read_text().split()
    read_speakers = {int(Path(p).stem.split("-")[-1]) for p in read}
    assert read_speakers == set(speakers) and not read_speakers & {5, 6, 7, 8}
    assert len(read) == 20 * 16  # every training speaker's clip, once
    assert read == pool_paths(features, speakers)
    history = json.loads((tmp_path / "tapt" / "result.json").read_text())["history"]
    assert len(history) == 1 and history[0]["pretrain/loss"] > 0
    assert list((tmp_path / "tapt" / "tensorboard").glob("events.out.tfevents.*"))
    tapt_model, _ = build_pretraining_model(PretrainConfig(model=str(model_dir)))
    # streamed through Ray Data into the worker, the pool trains as it does held in memory
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the 1-CPU Ray worker (the sums' order follows the threads)
    try:
        seed_everything(cfg.seed)
        in_memory, fe = build_pretraining_model(cfg)
        seed_everything(cfg.seed)  # rank 0
        outcome = run_pretraining(cfg, in_memory, fe, read_pool(features, speakers))
    finally:
        torch.set_num_threads(threads)
    assert _curve(history) == _curve(outcome.history)
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(tapt_model.state_dict()[name], tensor), name
    start, _ = build_pretraining_model(cfg)  # the frozen CNN is unchanged by TAPT
    cnn = tapt_model.wav2vec2.feature_extractor.state_dict()
    for name, tensor in start.wav2vec2.feature_extractor.state_dict().items():
        assert torch.equal(cnn[name], tensor), name
    # the cache key changes with the speakers read and the settings, not with anything else
    key = tapt_key(str(model_dir), speakers, features, cfg)
    assert key == tapt_key(str(model_dir), list(reversed(speakers)), features, cfg)
    assert key != tapt_key(str(model_dir), tapt_speakers(3, protocol), features, cfg)
    assert key != tapt_key(str(model_dir), speakers, features, PretrainConfig())


def test_demo_pool_has_other_voices_and_sentences_and_no_labels(tmp_path):
    import pyarrow.parquet as pq

    from ser_ray.corpus.demo_corpus import POOL_SEED, actor_voice, unlabeled_pool_clips
    from ser_ray.distributed.demo_encoder import RANDOM_DEMO_MODEL, resolve_model
    from ser_ray.features.unlabeled import write_demo_pool

    corpus_voices = {actor_voice(a, 0) for a in range(1, 25)}
    assert not corpus_voices & {actor_voice(s, POOL_SEED) for s in range(1, 41)}
    with pytest.raises(ValueError, match="seed 0"):
        unlabeled_pool_clips(1, 1, seed=0)
    pool = write_demo_pool(tmp_path / "pool", n_speakers=2, clips_per_speaker=2)
    table = pq.read_table(pool)
    assert table.column_names == ["path", "waveform"]  # no emotion, no speaker
    assert table.num_rows == 4 and len(set(table.column("path").to_pylist())) == 4
    assert resolve_model(RANDOM_DEMO_MODEL) == RANDOM_DEMO_MODEL  # load_model's random init
    assert resolve_model("facebook/wav2vec2-base") == "facebook/wav2vec2-base"


def test_tapt_progress_line_reads_the_runs_loss_curve(tmp_path):
    from ser_ray.distributed.tapt import _loss_line

    history = [
        {"epoch": e, "pretrain/contrastive": c, "pretrain/epoch_s": 40.0}
        for e, c in ((1, 3.9412), (2, 3.5), (3, 3.2104))
    ]
    (tmp_path / "result.json").write_text(json.dumps({"history": history, "config": {}}))
    line = _loss_line(tmp_path / "result.json")
    assert line == "contrastive 3.941 -> 3.210 over 3 epochs, 120 s"


def test_the_demo_encoder_is_keyed_by_its_fixed_threads(monkeypatch):
    from ser_ray.distributed import demo_encoder, resources

    threads = resources.DEMO_ENCODER_THREADS
    # the threads are part of the cached encoder's key: a build on other threads is not reused
    settings = demo_encoder._settings("full")
    assert settings["torch_threads"] == threads
    before = demo_encoder.demo_encoder_dir("full")
    monkeypatch.setattr(demo_encoder, "DEMO_ENCODER_THREADS", threads + 1)
    assert demo_encoder.demo_encoder_dir("full") != before


def test_the_demo_encoder_builds_here_on_its_threads_and_resumes_a_cut_off_build(tmp_path):
    import torch

    from ser_ray.distributed.demo_encoder import pretrain_here
    from ser_ray.features.unlabeled import write_demo_pool
    from ser_ray.training.engine import read_safetensors

    pool = write_demo_pool(tmp_path / "pool", n_speakers=2, clips_per_speaker=4)
    cfg = PretrainConfig(epochs=2, batch_size=4, crop_s=1.0)  # demo-random, from scratch
    threads, reported = [], []

    def on_report(metrics):
        reported.append(metrics["epoch"])
        threads.append(torch.get_num_threads())

    callers = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = pretrain_here(pool, tmp_path / "whole", cfg, torch_threads=2, on_report=on_report)
        assert torch.get_num_threads() == 1  # the caller's threads are given back
    finally:
        torch.set_num_threads(callers)
    assert threads == [2, 2] and reported == [1, 2]
    assert whole == tmp_path / "whole" / "epoch_2"
    assert sorted(p.name for p in whole.parent.glob("epoch_*")) == ["epoch_2"]  # older removed

    class CutOff(Exception):
        pass

    def cut_after_epoch_1(metrics):
        raise CutOff

    with pytest.raises(CutOff):
        pretrain_here(pool, tmp_path / "cut", cfg, torch_threads=2, on_report=cut_after_epoch_1)
    reported.clear()
    resumed = pretrain_here(pool, tmp_path / "cut", cfg, torch_threads=2, on_report=on_report)
    assert reported == [2]  # epoch 1 came from its checkpoint
    expected = read_safetensors(whole / MODEL_DIR)
    got = read_safetensors(resumed / MODEL_DIR)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
