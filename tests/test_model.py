"""Standard HF audio classifiers of every supported family: loading, run in parts, parity.

Tiny encoders of each family are saved with ``save_pretrained`` (no hub access). What we
train must compute exactly what ``*ForSequenceClassification`` and
``pipeline("audio-classification")`` compute, on every input path (waveform, cached CNN,
pooled layers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForAudioClassification,
    BertConfig,
    Data2VecAudioConfig,
    pipeline,
)

from ser_ray.distributed.feature_cache import cache_key
from ser_ray.models.ssl import (
    DEMO_MODEL,
    RANDOM_DEMO_MODEL,
    PartwiseClassifier,
    demo_config,
    demo_feature_extractor,
    frozen_encoder_outputs,
    inference_batches,
    load_model,
    model_probabilities,
    pad_waveforms,
    pads_exactly,
    prepare_waveform,
    samples_for_frames,
    save_model,
)

CLASSES = ["neutral", "happy", "sad"]
LENGTHS = (16_000, 9_600, 12_960, 12_800)  # 1.0, 0.6, 0.81, 0.8 s


def waveform_batch_inputs(waveforms, feature_extractor) -> dict[str, torch.Tensor]:
    """:class:`PartwiseClassifier` inputs for raw clips as the package batches them
    (``training.clip_data.collate``): per-clip normalisation, then dynamic padding."""
    prepared = [prepare_waveform(w, feature_extractor) for w in waveforms]
    values, lengths = pad_waveforms(prepared, feature_extractor.padding_value)
    return {"input_values": values, "lengths": lengths}


def _waves(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in LENGTHS]


def _trained_like(folder, **kw) -> tuple[PartwiseClassifier, object]:
    """A classifier with a non-trivial head (visible preferences, unequal layer weights)."""
    model, fe = load_model(folder, CLASSES, use_weighted_layer_sum=True, seed=1, **kw)
    torch.manual_seed(2)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 3.0)
        model.layer_weights.copy_(torch.tensor([0.3, -0.2, 0.5]))
    return PartwiseClassifier(model, fe.return_attention_mask).eval(), fe


def _standard_logits(model, fe, waves) -> torch.Tensor:
    """The HF class's own forward, one clip at a time (what pipeline() does)."""
    with torch.no_grad():
        return torch.cat(
            [model(**fe(w, sampling_rate=16_000, return_tensors="pt")).logits for w in waves]
        )


def test_encoder_of_each_family_loads_into_its_own_class(family, encoders):
    folder = encoders[family]
    given = load_file(str(folder / "model.safetensors"))
    model, _ = load_model(folder, CLASSES, use_weighted_layer_sum=True, seed=0)
    assert type(model).__name__.endswith("ForSequenceClassification")
    assert model.config.model_type == json.loads((folder / "config.json").read_text())["model_type"]
    encoder = model.base_model.state_dict()
    assert set(encoder) == set(given)  # every encoder weight loaded ...
    for name, value in given.items():
        assert torch.equal(encoder[name], value), name  # ... unchanged (CNN included)
    assert model.config.id2label == {0: "neutral", 1: "happy", 2: "sad"}
    assert torch.allclose(model.layer_weights, torch.full((3,), 1 / 3))
    assert model.config.layerdrop == 0.0  # the weighted layer sum needs every layer
    assert model.classifier.weight.abs().sum() > 0
    assert not any(p.requires_grad for p in model.base_model.feature_extractor.parameters())


def test_saved_checkpoint_is_the_standard_class(family, encoders, tmp_path):
    """Plain transformers loads every weight of our checkpoint (nothing missing or extra)."""
    runner, fe = _trained_like(encoders[family])
    save_model(runner.model, fe, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["architectures"] == [type(runner.model).__name__]
    assert saved["use_weighted_layer_sum"]
    assert saved["label2id"] == {"neutral": 0, "happy": 1, "sad": 2}
    plain, info = AutoModelForAudioClassification.from_pretrained(
        tmp_path / "m", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    torch.testing.assert_close(
        _standard_logits(plain, fe, _waves()), _standard_logits(runner.model, fe, _waves())
    )


def test_run_in_parts_equals_the_standard_class(family, encoders):
    """Waveforms (batched by the padding rule), cached CNN outputs and pooled layers all give
    the logits of the standard forward on each clip alone."""
    runner, fe = _trained_like(encoders[family])
    waves = _waves(3)
    reference = _standard_logits(runner.model, fe, waves)
    with torch.no_grad():
        for batch in inference_batches(LENGTHS, 4, exact_length=not runner.pads_exactly):
            got = runner(**waveform_batch_inputs([waves[i] for i in batch], fe)).logits
            torch.testing.assert_close(got, reference[batch], atol=1e-5, rtol=0)
        cnn = [torch.from_numpy(frozen_encoder_outputs(runner, fe, w, "cnn")) for w in waves]
        if runner.pads_exactly:  # padded cached CNN outputs, one batch
            feats = torch.nn.utils.rnn.pad_sequence(cnn, batch_first=True)
            frames = torch.tensor([c.shape[0] for c in cnn])
            cached = runner(cnn_features=feats, frame_lengths=frames).logits
        else:
            cached = torch.cat([runner(cnn_features=c[None]).logits for c in cnn])
        torch.testing.assert_close(cached, reference, atol=1e-5, rtol=0)
        runner.freeze_encoder()  # probe mode: pooled layer states per clip
        pooled = [torch.from_numpy(frozen_encoder_outputs(runner, fe, w, "pooled")) for w in waves]
        assert pooled[0].shape == (3, 32)
        probe = runner(pooled_layers=torch.stack(pooled)).logits
        torch.testing.assert_close(probe, reference, atol=1e-5, rtol=0)
    assert cache_key(runner, fe, "cnn") != cache_key(runner, fe, "pooled")


def test_head_standardisation_folds_into_the_standard_projector(family, encoders):
    """Trained on standardised inputs, the head is saved as a plain projector that gives the
    same logits (the standard class alone computes them)."""
    runner, fe = _trained_like(encoders[family])
    waves = _waves(4)
    hidden = runner.config.hidden_size
    generator = torch.Generator().manual_seed(5)
    mean = torch.randn(hidden, generator=generator)
    std = torch.rand(hidden, generator=generator) + 0.05
    std[0] = 0.0  # a constant feature: shifted, not scaled
    runner.standardize_head_inputs(mean, std)
    assert runner.head_scale[0] == 1.0
    with torch.no_grad():
        standardised = torch.cat([runner(**waveform_batch_inputs([w], fe)).logits for w in waves])
        assert not torch.allclose(standardised, _standard_logits(runner.model, fe, waves))
        standard = runner.standard_model()
    torch.testing.assert_close(_standard_logits(standard, fe, waves), standardised)
    assert torch.equal(runner.head_shift, torch.zeros(hidden))
    assert torch.equal(runner.head_scale, torch.ones(hidden))
    assert "head_shift" not in runner.state_dict()  # never part of a checkpoint


def test_pipeline_gives_our_probabilities(family, encoders, tmp_path):
    runner, fe = _trained_like(encoders[family])
    folder = save_model(runner.model, fe, tmp_path / "m")
    loaded, fe2 = load_model(folder)
    ours = model_probabilities(loaded.eval(), fe2, _waves(4), batch_size=4)
    classify = pipeline("audio-classification", model=str(folder), top_k=None, device="cpu")
    for wave, row in zip(_waves(4), ours, strict=True):
        scores = {d["label"]: d["score"] for d in classify(wave)}
        np.testing.assert_allclose([scores[c] for c in CLASSES], row, atol=1e-5, rtol=0)
    assert np.ptp(ours) > 0.1  # a head with preferences, so the comparison means something


def test_padding_rule():
    lengths = [5, 7, 5, 9, 7, 7]
    assert inference_batches(lengths, 2) == [[3, 1], [4, 5], [0, 2]]
    assert inference_batches(lengths, 2, exact_length=True) == [[3], [1, 4], [5], [0, 2]]
    group, layer = demo_config(), demo_config(feat_extract_norm="layer")
    assert not pads_exactly(group, True) and not pads_exactly(layer, False)
    assert pads_exactly(layer, True)
    assert not pads_exactly(Data2VecAudioConfig(), True)  # stacked positional convolutions


def test_samples_for_frames_inverts_the_cnn_length_formula():
    runner = PartwiseClassifier(load_model(RANDOM_DEMO_MODEL, CLASSES)[0], False)
    frames = torch.arange(1, 80)
    samples = samples_for_frames(runner.config, frames)
    assert samples[0] == 400  # the receptive field
    assert torch.equal(runner.frame_lengths(samples), frames)
    assert torch.equal(runner.frame_lengths(samples - 1), frames - 1)  # the fewest samples


def test_a_classifier_with_other_classes_is_refused(encoders, tmp_path):
    model, fe = load_model(encoders["wavlm-base-plus"], CLASSES)
    save_model(model, fe, tmp_path / "m")
    with pytest.raises(ValueError, match="trained for classes .* set merge_calm"):
        load_model(tmp_path / "m", ["angry", "calm", "sad"])
    assert load_model(tmp_path / "m", CLASSES)[0].config.model_type == "wavlm"


def test_weights_that_do_not_load_stop_with_their_names(encoders, tmp_path):
    # a wav2vec2 config next to WavLM weights: WavLM's relative position weights are left out
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("model.safetensors", "preprocessor_config.json"):
        (mixed / name).write_bytes((encoders["wavlm-base-plus"] / name).read_bytes())
    (mixed / "config.json").write_bytes((encoders["wav2vec2-base"] / "config.json").read_bytes())
    with pytest.raises(ValueError, match=r"unexpected \(not used\): .*gru_rel_pos"):
        load_model(mixed, CLASSES)
    # one encoder tensor gone
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (partial / name).write_bytes((encoders["hubert-base"] / name).read_bytes())
    weights = load_file(str(encoders["hubert-base"] / "model.safetensors"))
    del weights["encoder.layers.1.attention.k_proj.weight"]
    save_file(weights, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing .*encoder\.layers\.1\.attention\.k_proj\.w"):
        load_model(partial, CLASSES)


def test_demo_means_the_pretrained_encoder_and_must_be_resolved_first():
    with pytest.raises(ValueError, match="pre-trained demo encoder: resolve it .*resolve_model"):
        load_model(DEMO_MODEL, CLASSES)
    # demo-random: the demo-size model, the same random weights every time
    (a, _), (b, _) = load_model(RANDOM_DEMO_MODEL, CLASSES), load_model(RANDOM_DEMO_MODEL, CLASSES)
    assert a.config.hidden_size == demo_config().hidden_size
    assert all(
        torch.equal(v, b.wav2vec2.state_dict()[k]) for k, v in a.wav2vec2.state_dict().items()
    )


def test_other_model_families_are_refused(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    demo_feature_extractor().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert' model; --model takes .*wav2vec2, hubert, wavlm"):
        load_model(tmp_path, CLASSES)


def test_demo_config_keeps_50_frames_per_second():
    model, fe = load_model(RANDOM_DEMO_MODEL, CLASSES)
    runner = PartwiseClassifier(model, fe.return_attention_mask)
    assert np.prod(demo_config().conv_stride) == 320  # 16 kHz / 320 = 50 frames/s
    assert runner.frame_lengths(torch.tensor([16_000, 32_000])).tolist() == [49, 99]
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert fe.do_normalize and not fe.return_attention_mask and not runner.pads_exactly


def test_group_norm_cnn_runs_per_clip_on_unpadded_audio():
    model, fe = load_model(RANDOM_DEMO_MODEL, CLASSES)
    runner = PartwiseClassifier(model, False).eval()
    inputs = waveform_batch_inputs(_waves(), fe)
    with torch.no_grad():
        feats, frames = runner.cnn_features(inputs["input_values"], inputs["lengths"])
        for i, w in enumerate(_waves()):
            x = torch.from_numpy(prepare_waveform(w, fe))[None]
            alone = model.wav2vec2.feature_extractor(x).transpose(1, 2)[0]
            torch.testing.assert_close(feats[i, : frames[i]], alone, atol=1e-6, rtol=0)
            assert torch.all(feats[i, frames[i] :] == 0)


def test_prepare_waveform_normalises_each_clip_alone():
    fe = demo_feature_extractor()
    x = np.linspace(-1, 3, 8000, dtype=np.float32)
    y = prepare_waveform(x, fe)
    assert abs(y.mean()) < 1e-5 and y.std() == pytest.approx(1.0, abs=1e-3)
    fe.do_normalize = False
    np.testing.assert_array_equal(prepare_waveform(x, fe), x)


def test_freezing_modes():
    model, _ = load_model(RANDOM_DEMO_MODEL, CLASSES)
    runner = PartwiseClassifier(model, False)
    assert runner.feature_encoder_frozen
    trainable = {n for n, p in runner.named_parameters() if p.requires_grad}
    assert not any(n.startswith("model.wav2vec2.feature_extractor.") for n in trainable)
    assert "model.wav2vec2.encoder.layers.0.attention.q_proj.weight" in trainable
    assert runner.is_encoder_parameter("model.wav2vec2.encoder.layers.0.attention.q_proj.weight")
    assert not runner.is_encoder_parameter("model.projector.weight")
    runner.set_transformer_trainable(False)
    assert {n for n, p in runner.named_parameters() if p.requires_grad} == {
        "model.projector.weight",
        "model.projector.bias",
        "model.classifier.weight",
        "model.classifier.bias",
    }
    runner.set_transformer_trainable(True)
    runner.freeze_encoder()
    runner.train()
    assert not any(p.requires_grad for p in model.wav2vec2.parameters())
    assert not model.wav2vec2.training and runner.training  # no encoder dropout


def test_weighted_layer_sum_learns_layer_weights():
    model, fe = load_model(RANDOM_DEMO_MODEL, CLASSES, use_weighted_layer_sum=True, seed=0)
    runner = PartwiseClassifier(model, False, head_dropout=0.1).train()
    out = runner(**waveform_batch_inputs(_waves(), fe), labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    assert model.layer_weights.grad is not None and model.layer_weights.grad.abs().sum() > 0
    assert out.loss.item() == pytest.approx(np.log(3), abs=0.05)  # small head init


def test_a_pretraining_checkpoint_with_legacy_names_loads(tmp_path):
    """Hub wav2vec2 checkpoints are ``Wav2Vec2ForPreTraining`` with ``weight_g``/``weight_v``
    names: the quantizer is left out, every encoder weight loads."""
    from transformers import Wav2Vec2ForPreTraining

    Wav2Vec2ForPreTraining(demo_config()).save_pretrained(tmp_path)
    demo_feature_extractor().save_pretrained(tmp_path)
    current = load_file(str(tmp_path / "model.safetensors"))
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in current.items()
    }
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in legacy
    assert any(k.startswith("quantizer.") for k in legacy)
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_model(tmp_path, CLASSES)
    for name, value in model.state_dict().items():
        if name.startswith("wav2vec2."):
            assert torch.equal(value, current[name]), name
