"""The fine-tuning memory estimate (ser_ray.training.memory) against what autograd really saves.

The "known byte count" is measured, not typed in: every tensor the forward pass saves for
backward is counted once (by storage, parameters excluded) through
``torch.autograd.graph.saved_tensors_hooks``, on CPU in float32, for configs other than the
ones the coefficients were read from.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Wav2Vec2ForSequenceClassification

from ser_ray.models.ssl import demo_config
from ser_ray.training.memory import (
    conv_output_lengths,
    estimate_finetune_memory,
    estimate_for_model,
)


def _model(frozen_cnn: bool = True, **overrides) -> Wav2Vec2ForSequenceClassification:
    torch.manual_seed(0)
    model = Wav2Vec2ForSequenceClassification(demo_config(**overrides))
    model.train()
    if frozen_cnn:
        model.freeze_feature_encoder()
    return model


def _saved_bytes(model: torch.nn.Module, batch_size: int, samples: int) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randn(batch_size, samples)).logits.sum()
    return sum(saved.values())


WIDER = dict(hidden_size=96, intermediate_size=384, num_attention_heads=6, num_hidden_layers=3)


@pytest.mark.parametrize(
    ("overrides", "batch_size", "samples"),
    [(WIDER, 3, 40_000), ({**WIDER, "conv_dim": (48,) * 7}, 2, 64_000), ({}, 5, 24_000)],
)
def test_the_activation_estimate_is_within_20_percent_of_what_autograd_saves(
    overrides, batch_size, samples
):
    model = _model(**overrides)
    measured = _saved_bytes(model, batch_size, samples)
    # CPU attention with dropout saves its T x T probabilities (not fused)
    estimate = estimate_for_model(model, batch_size, samples, fused_attention=False)
    assert estimate.activations == pytest.approx(measured, rel=0.2)


def test_fused_attention_saves_no_frame_by_frame_matrix():
    model = _model(attention_dropout=0.0, **WIDER)  # CPU SDPA then takes its fused kernel
    measured = _saved_bytes(model, 3, 64_000)
    fused = estimate_for_model(model, 3, 64_000, fused_attention=True)
    unfused = estimate_for_model(model, 3, 64_000, fused_attention=False)
    assert fused.activations == pytest.approx(measured, rel=0.2)
    assert unfused.activations > 1.3 * measured  # the T x T term is not there


def test_a_trainable_cnn_adds_its_saved_outputs():
    for norm in ("group", "layer"):
        model = _model(frozen_cnn=False, feat_extract_norm=norm, **WIDER)
        estimate = estimate_for_model(model, 2, 48_000)
        assert estimate.cnn_transient == 0
        assert estimate.activations == pytest.approx(_saved_bytes(model, 2, 48_000), rel=0.2)


def test_weights_gradients_and_adamw_state_follow_the_parameter_counts():
    model = _model(**WIDER)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < n_trainable < n_params  # the CNN is frozen
    estimate = estimate_for_model(model, 1, 16_000)
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == (
        4 * n_params,
        4 * n_trainable,
        8 * n_trainable,
    )


def test_the_frozen_cnn_peak_is_its_first_layer_and_counts_when_it_dominates():
    config = demo_config(conv_dim=(512,) * 7)  # base's CNN widths
    lengths = conv_output_lengths(config, 80_000)
    assert lengths[0] == 15_999 and lengths[-1] == 249  # 5 s at 16 kHz: 249 frames
    estimate = estimate_finetune_memory(config, 10, 10, batch_size=8, max_samples=80_000)
    assert estimate.cnn_transient == 4 * 8 * (80_000 + 2 * 512 * 15_999)
    assert estimate.total == 4 * 10 + 4 * 10 + 8 * 10 + estimate.cnn_transient
    cached = estimate_finetune_memory(
        config, 10, 10, batch_size=8, max_samples=80_000, cnn_in_step=False
    )
    assert cached.cnn_transient == 0 and cached.total == 160 + cached.activations
