"""The wav2vec2 classifier: HF save/load, attention-mask handling, freezing, cache parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Model

from ser_ray.feature_cache import cache_key, clip_features
from ser_ray.model import (
    demo_config,
    demo_feature_extractor,
    encoder_batch_inputs,
    load_model,
    prepare_waveform,
    save_model,
)

CLASSES = ["neutral", "happy", "sad"]
LENGTHS = (16_000, 24_000, 20_320)  # 1.0, 1.5, 1.27 s


def _waves(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in LENGTHS]


def _model(kind: str, **kw):
    """``group``: wav2vec2-base style (no attention mask); ``layer``: large-lv60 style."""
    fe = demo_feature_extractor(return_attention_mask=kind == "layer")
    model, fe = load_model(
        "demo", CLASSES, feature_extractor=fe, feat_extract_norm=kind, seed=1, **kw
    )
    return model.eval(), fe


def test_demo_config_keeps_50_frames_per_second():
    model, fe = _model("group")
    assert np.prod(demo_config().conv_stride) == 320  # 16 kHz / 320 = 50 frames/s
    frames = model.frame_lengths(torch.tensor([16_000, 32_000]))
    assert frames.tolist() == [49, 99]  # (n - 400) // 320 + 1
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert fe.do_normalize and not fe.return_attention_mask and not model.use_attention_mask


def test_save_and_from_pretrained_local_folder(tmp_path):
    model, fe = _model("layer", use_weighted_layer_sum=True)
    with torch.no_grad():
        model.layer_weights.copy_(torch.tensor([0.3, -0.2, 0.5]))
    save_model(model, fe, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert (tmp_path / "m" / "preprocessor_config.json").exists()
    loaded, fe2 = load_model(tmp_path / "m", CLASSES)
    assert loaded.config.id2label == {0: "neutral", 1: "happy", 2: "sad"}
    assert loaded.config.label2id == {"neutral": 0, "happy": 1, "sad": 2}
    assert fe2.return_attention_mask and loaded.use_attention_mask
    inputs = encoder_batch_inputs(_waves(), fe2)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded.eval()(**inputs).logits)
    with pytest.raises(ValueError, match="trained for classes"):
        load_model(tmp_path / "m", ["angry", "calm", "sad"])


def test_from_pretrained_plain_encoder_gets_a_new_head(tmp_path):
    torch.manual_seed(3)
    encoder = Wav2Vec2Model(demo_config())
    encoder.save_pretrained(tmp_path / "enc")
    demo_feature_extractor().save_pretrained(tmp_path / "enc")
    model, fe = load_model(tmp_path / "enc", CLASSES, use_weighted_layer_sum=True, seed=0)
    for name, value in encoder.state_dict().items():
        assert torch.equal(model.wav2vec2.state_dict()[name], value), name
    assert model.config.num_labels == 3 and torch.all(model.layer_weights == 0)
    assert model.classifier.weight.abs().sum() > 0  # initialised, not empty memory


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_attention_mask_follows_feature_extractor(kind, monkeypatch):
    model, fe = _model(kind)
    seen = []
    original = model.wav2vec2.encoder.forward
    monkeypatch.setattr(
        model.wav2vec2.encoder,
        "forward",
        lambda h, attention_mask=None, **kw: (
            seen.append(attention_mask) or original(h, attention_mask, **kw)
        ),
    )
    waves = _waves()
    with torch.no_grad():
        batched = model(**encoder_batch_inputs(waves, fe)).logits
        single = torch.cat([model(**encoder_batch_inputs([w], fe)).logits for w in waves])
    if kind == "layer":  # mask: padding is invisible, batched == one by one
        assert seen[0] is not None and seen[0].sum(1).tolist() == [49, 74, 63]
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    else:  # wav2vec2-base was trained without a mask: none is passed
        assert all(m is None for m in seen)
        assert not torch.allclose(batched, single, atol=1e-6)  # hence: batch similar lengths


def test_group_norm_cnn_runs_per_clip_on_unpadded_audio():
    model, fe = _model("group")
    waves = [prepare_waveform(w, fe) for w in _waves()]
    inputs = encoder_batch_inputs(_waves(), fe)
    with torch.no_grad():
        feats, frames = model.cnn_features(inputs["input_values"], inputs["lengths"])
        for i, w in enumerate(waves):
            alone = model.wav2vec2.feature_extractor(torch.from_numpy(w)[None]).transpose(1, 2)[0]
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
    model, _ = _model("group")
    assert model.feature_encoder_frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("wav2vec2.feature_extractor.") for n in trainable)
    assert "wav2vec2.encoder.layers.0.attention.q_proj.weight" in trainable
    model.set_transformer_trainable(False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "projector.weight",
        "projector.bias",
        "classifier.weight",
        "classifier.bias",
    }
    model.set_transformer_trainable(True)
    probe, _ = load_model("demo", CLASSES, probe=True)
    probe.train()
    assert not any(p.requires_grad for p in probe.wav2vec2.parameters())
    assert not probe.wav2vec2.training and probe.classifier.training  # no encoder dropout


def test_weighted_layer_sum_learns_layer_weights():
    model, fe = _model("group", use_weighted_layer_sum=True)
    model.train()
    out = model(**encoder_batch_inputs(_waves(), fe), labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    assert model.layer_weights.grad is not None and model.layer_weights.grad.abs().sum() > 0
    assert out.loss.item() == pytest.approx(np.log(3), abs=0.05)  # small head init


@pytest.mark.parametrize(
    ("kind", "probe", "weighted"),
    [
        ("group", False, True),
        ("layer", False, False),
        ("layer", True, True),
        ("group", True, False),
    ],
)
def test_cached_and_uncached_logits_match(kind, probe, weighted):
    fe = demo_feature_extractor(return_attention_mask=kind == "layer")
    model, fe = load_model(
        "demo",
        CLASSES,
        feature_extractor=fe,
        feat_extract_norm=kind,
        probe=probe,
        use_weighted_layer_sum=weighted,
        seed=2,
    )
    model.eval()
    waves = _waves(5)
    cache_kind = "pooled" if probe else "cnn"
    cached = [torch.from_numpy(clip_features(model, fe, w, cache_kind)) for w in waves]
    with torch.no_grad():
        if probe:  # pooled layers per clip vs the full model, one clip at a time
            from_cache = model(pooled_layers=torch.stack(cached)).logits
            full = torch.cat([model(**encoder_batch_inputs([w], fe)).logits for w in waves])
        else:  # padded batches of cached CNN outputs vs the same batch of waveforms
            feats = torch.nn.utils.rnn.pad_sequence(cached, batch_first=True)
            frames = torch.tensor([c.shape[0] for c in cached])
            from_cache = model(cnn_features=feats, frame_lengths=frames).logits
            full = model(**encoder_batch_inputs(waves, fe)).logits
    torch.testing.assert_close(from_cache, full, atol=1e-5, rtol=0)
    assert cache_key(model, fe, cache_kind).startswith(cache_kind)
