"""Emotion classifiers that are standard Hugging Face audio classifiers, run in parts.

What a run trains and saves is a plain ``AutoModelForAudioClassification`` model of the
encoder's family (``Wav2Vec2ForSequenceClassification``, ``HubertFor...``, ``WavLMFor...``,
``Data2VecAudioFor...``): optional softmax-weighted sum of every hidden layer
(``use_weighted_layer_sum``), ``projector`` per frame, mean over the valid frames,
``classifier``; labels in ``id2label``/``label2id``. So ``pipeline("audio-classification")``
and ``AutoModelForAudioClassification.from_pretrained`` compute exactly our probabilities.

The encoder comes from ``from_pretrained(name_or_path)`` (hub id or folder of any family in
:data:`FAMILIES`, base or large, stable-layer-norm or not) or, for ``demo-random``
(:data:`RANDOM_DEMO_MODEL`), from the demo-size :func:`demo_config` with random weights of a
fixed init seed. ``demo`` (:data:`DEMO_MODEL`, the pre-trained demo encoder) is a ``--model``
name that :func:`ser_ray.distributed.demo_encoder.resolve_model` turns into its folder first.
Loading is strict: encoder weights that do not all load stop with an error naming the keys
(see :func:`load_model`).

:class:`PartwiseClassifier` runs such a model in parts, so that the frozen parts can be
cached and DDP wraps one ``forward``. It takes one of three inputs:

- ``input_values`` (waveforms, padded) + ``lengths`` (samples): the full model. With a
  group-norm CNN (wav2vec2-base style) the CNN runs per clip on the unpadded waveform,
  because group norm over time sees the padding; a layer-norm CNN runs batched (exact for
  the valid frames).
- ``cnn_features`` (B, T, C, padded) + ``frame_lengths``: the frozen CNN's output; the rest
  of the encoder is the family's own forward with the CNN's output given.
- ``pooled_layers`` (B, K, H): every hidden layer mean-pooled over the clip (probe mode).

The head is computed as ``classifier(projector(sum_k w_k mean_t h_kt))``, which equals the
standard ``classifier(mean_t projector(sum_k w_k h_kt))`` because the projector is affine and
the softmax weights sum to one; that is what lets probe mode cache one pooled vector per
layer. ``head_dropout`` (after the projector) acts in training only and is not part of the
saved model.

Padding rule (:func:`pads_exactly`): the standard class pools over the attention mask when
the feature extractor returns one (``return_attention_mask``) and over every frame when it
does not; a group-norm CNN also sees padding. Padded batches give the per-clip result only
with an attention mask and a layer-norm CNN (and not for data2vec-audio); otherwise
evaluation and prediction run clips of equal length together (:func:`inference_batches`),
i.e. mostly clip by clip.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForAudioClassification,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForSequenceClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging as hf_logging

from ser_ray.common import storage
from ser_ray.features.speaker_norm import SpeakerNormError, speaker_normalize
from ser_ray.models.precision import resolve_amp

log = logging.getLogger(__name__)

#: ``--model`` name of the pre-trained demo encoder: a folder once resolved
#: (:func:`ser_ray.distributed.demo_encoder.resolve_model`); :func:`load_model` refuses it.
DEMO_MODEL = "demo"
#: The demo-size model with random weights (:func:`demo_config`, init seed
#: :data:`DEMO_ENCODER_SEED`): what :func:`load_model` builds for this name, and what
#: pre-training from scratch starts from.
RANDOM_DEMO_MODEL = "demo-random"
SAMPLE_RATE_HZ = 16_000
#: Init seed of the demo-size model: "demo-random" names one fixed random encoder.
DEMO_ENCODER_SEED = 0
#: Each encoder family (``config.model_type``) whose ``*ForSequenceClassification`` we train,
#: and its hub model on a real corpus when --model does not name one.
DEFAULT_MODELS = {
    "wav2vec2": "facebook/wav2vec2-base",
    "hubert": "facebook/hubert-base-ls960",
    "wavlm": "microsoft/wavlm-base-plus",
    "data2vec-audio": "facebook/data2vec-audio-base",
}
FAMILIES = tuple(DEFAULT_MODELS)
#: Labels of a head that is never used (a frozen encoder's cached or pooled outputs): any two.
HEAD_CLASSES = ("class_0", "class_1")
#: Parameter names of the standard classification head.
HEAD_PARAMETERS = ("projector.", "classifier.", "layer_weights")


def demo_config(
    num_labels: int = 8, feat_extract_norm: str = "group", **overrides
) -> Wav2Vec2Config:
    """A demo-size wav2vec2 config: base's CNN strides (16 kHz -> 50 frames/s), tiny widths.

    ``feat_extract_norm="group"`` is wav2vec2-base style (group norm over time in the first
    CNN layer, post-layer-norm transformer); ``"layer"`` is large-lv60 style (layer-norm
    CNN, stable layer norm transformer).
    """
    if feat_extract_norm not in ("group", "layer"):
        raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got {feat_extract_norm!r}")
    settings = dict(
        conv_dim=(32,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),  # 320 samples per frame, as in wav2vec2-base
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),  # 400-sample receptive field (25 ms)
        conv_bias=feat_extract_norm == "layer",
        feat_extract_norm=feat_extract_norm,
        do_stable_layer_norm=feat_extract_norm == "layer",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        classifier_proj_size=64,
        layerdrop=0.0,
        mask_time_prob=0.05,
        num_labels=num_labels,
    )
    settings.update(overrides)
    return Wav2Vec2Config(**settings)


def demo_feature_extractor(return_attention_mask: bool = False) -> Wav2Vec2FeatureExtractor:
    """The feature extractor of the demo model (wav2vec2-base settings by default)."""
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE_HZ,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=return_attention_mask,
    )


def cnn_norm(config: PretrainedConfig) -> str:
    """``group`` (normalises over time: padding changes it) or ``layer`` (per frame).

    data2vec-audio has no ``feat_extract_norm``: its CNN layers all use layer norm.
    """
    return getattr(config, "feat_extract_norm", "layer")


def pads_exactly(config: PretrainedConfig, return_attention_mask: bool) -> bool:
    """Whether the standard class gives every clip of a padded batch its per-clip output.

    It needs an attention mask and a CNN that normalises per frame, and a positional
    convolution of one layer: data2vec-audio stacks several, so the zeroed padding turns
    non-zero after the first and reaches the valid frames through the next ones.
    """
    one_layer_positions = config.model_type != "data2vec-audio"
    return bool(return_attention_mask) and cnn_norm(config) == "layer" and one_layer_positions


def inference_batches(
    lengths: Sequence[int], batch_size: int, exact_length: bool = False
) -> list[list[int]]:
    """All clips sorted by length (least padding), in batches of at most ``batch_size``;
    with ``exact_length`` a batch only holds clips of one length (no padding at all)."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    if not exact_length:
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for length in dict.fromkeys(lengths[order].tolist()):
        same = order[lengths[order] == length]
        batches += [same[i : i + batch_size].tolist() for i in range(0, len(same), batch_size)]
    return batches


def masked_mean(hidden: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean over time (dim 1) of ``hidden`` (B, T, H) over the frames where ``frame_mask``."""
    weights = frame_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def frame_mask_from_lengths(frame_lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Bool mask (B, T): True on the first ``frame_lengths[b]`` frames."""
    steps = torch.arange(num_frames, device=frame_lengths.device)
    return steps.unsqueeze(0) < frame_lengths.unsqueeze(1)


def samples_for_frames(config: PretrainedConfig, frame_lengths: torch.Tensor) -> torch.Tensor:
    """The fewest samples whose CNN output has ``frame_lengths`` frames (inverse of the
    conv length formula ``floor((n - kernel) / stride) + 1``, layer by layer)."""
    samples = frame_lengths.to(torch.long)
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride, strict=True))):
        samples = (samples - 1) * stride + kernel
    return samples


class _GivenCNNOutput(nn.Module):
    """Stands in for the CNN: returns features computed before, as (B, C, T)."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features

    def forward(self, _input_values: torch.Tensor) -> torch.Tensor:
        return self.features.transpose(1, 2)


@contextlib.contextmanager
def _cnn_output_given(encoder: nn.Module, features: torch.Tensor) -> Iterator[None]:
    cnn = encoder.feature_extractor
    encoder.feature_extractor = _GivenCNNOutput(features)
    try:
        yield
    finally:
        encoder.feature_extractor = cnn


class PartwiseClassifier(nn.Module):
    """Runs a standard ``*ForSequenceClassification`` model (``self.model``) in parts.

    ``use_attention_mask`` follows the feature extractor's ``return_attention_mask``, as in
    the pipeline; ``head_dropout`` is training-only dropout after the projector.
    """

    def __init__(self, model: PreTrainedModel, use_attention_mask: bool, head_dropout: float = 0.0):
        super().__init__()
        if model.config.model_type not in FAMILIES:
            raise ValueError(f"{model.config.model_type} is not one of {FAMILIES}")
        self.model = model
        self.use_attention_mask = bool(use_attention_mask)
        self.head_dropout = nn.Dropout(head_dropout)
        self.num_layer_states = model.config.num_hidden_layers + 1
        self._encoder_frozen = False
        # the head's input standardised while training (standardize_head_inputs), folded
        # into the projector before the model is saved (standard_model); identity otherwise
        hidden = model.config.hidden_size
        self.register_buffer("head_shift", torch.zeros(hidden), persistent=False)
        self.register_buffer("head_scale", torch.ones(hidden), persistent=False)

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def encoder(self) -> PreTrainedModel:
        """The family's base model (``model.wav2vec2``, ``model.hubert``, ...)."""
        return self.model.base_model

    @property
    def pads_exactly(self) -> bool:
        return pads_exactly(self.config, self.use_attention_mask)

    # -- freezing -------------------------------------------------------------------------
    @property
    def feature_encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.feature_extractor.parameters())

    def freeze_encoder(self) -> None:
        """Probe mode: freeze the whole encoder and keep it in eval mode (no dropout)."""
        self.model.freeze_feature_encoder()
        self.model.freeze_base_model()
        self._encoder_frozen = True
        self.encoder.eval()

    def set_transformer_trainable(self, trainable: bool) -> None:
        """(Un)freeze the transformer part (feature projection + encoder), not the CNN."""
        if self._encoder_frozen:
            return
        for p in self.transformer_parameters():
            p.requires_grad = trainable

    def transformer_parameters(self) -> Iterator[nn.Parameter]:
        """Encoder parameters other than the CNN's (projection, transformer, mask embedding)."""
        cnn = {id(p) for p in self.encoder.feature_extractor.parameters()}
        return (p for p in self.encoder.parameters() if id(p) not in cnn)

    def is_encoder_parameter(self, name: str) -> bool:
        """Whether ``name`` (as in ``self.named_parameters()``) belongs to the encoder."""
        return name.startswith(f"model.{self.model.base_model_prefix}.")

    def train(self, mode: bool = True) -> PartwiseClassifier:
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()
        return self

    # -- the pieces of the forward pass ---------------------------------------------------
    def frame_lengths(self, lengths_samples: torch.Tensor) -> torch.Tensor:
        """Valid CNN frames of clips with ``lengths_samples`` samples."""
        return self.model._get_feat_extract_output_lengths(lengths_samples).to(torch.long)

    def cnn_features(
        self, input_values: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CNN output (B, T, C), zero past each clip's frames, and the frame lengths (B,).

        Group-norm CNN: per clip on the unpadded waveform (the reference). Layer-norm CNN:
        batched (valid frames never see the padding).
        """
        if lengths is None:
            lengths = torch.full(
                (input_values.shape[0],), input_values.shape[1], device=input_values.device
            )
        lengths = lengths.to(device=input_values.device, dtype=torch.long)
        frame_lengths = self.frame_lengths(lengths)
        if int(frame_lengths.min()) < 1:
            raise ValueError(
                f"a clip of {int(lengths.min())} samples is shorter than the CNN's receptive "
                "field; clips must be at least 400 samples (25 ms at 16 kHz)"
            )
        cnn = self.encoder.feature_extractor
        grad = torch.is_grad_enabled() and not self.feature_encoder_frozen
        with torch.set_grad_enabled(grad):
            if cnn_norm(self.config) == "group":
                parts = [
                    cnn(input_values[i : i + 1, : int(n)]).transpose(1, 2)[0]
                    for i, n in enumerate(lengths)
                ]
                feats = nn.utils.rnn.pad_sequence(parts, batch_first=True)
            else:
                feats = cnn(input_values).transpose(1, 2)
                mask = frame_mask_from_lengths(frame_lengths, feats.shape[1])
                feats = feats * mask.unsqueeze(-1).to(feats.dtype)
        return feats, frame_lengths

    def layer_states(
        self, cnn_features: torch.Tensor, frame_lengths: torch.Tensor, all_layers: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Hidden states after the CNN ([last] or every layer's), and the valid-frame mask.

        The family's own encoder forward runs with the CNN's output given; with an attention
        mask it gets one in samples that yields exactly ``frame_lengths`` frames."""
        frame_lengths = frame_lengths.to(cnn_features.device)
        attention_mask = None
        if self.use_attention_mask:
            samples = samples_for_frames(self.config, frame_lengths)
            steps = torch.arange(int(samples.max()), device=cnn_features.device)
            attention_mask = (steps.unsqueeze(0) < samples.unsqueeze(1)).long()
        with _cnn_output_given(self.encoder, cnn_features):
            out = self.encoder(
                cnn_features, attention_mask=attention_mask, output_hidden_states=all_layers
            )
        states = list(out.hidden_states) if all_layers else [out.last_hidden_state]
        if all_layers and len(states) != self.num_layer_states:
            raise RuntimeError(
                f"the encoder returned {len(states)} hidden states, not {self.num_layer_states}"
                " (LayerDrop skips layers; load_model turns it off for the weighted layer sum)"
            )
        return states, frame_mask_from_lengths(frame_lengths, cnn_features.shape[1])

    def pooled_layer_states(
        self, cnn_features: torch.Tensor, frame_lengths: torch.Tensor, all_layers: bool = True
    ) -> torch.Tensor:
        """Mean-pooled hidden states (B, K, H): K = num_layers + 1, or 1 (last layer only)."""
        states, frame_mask = self.layer_states(cnn_features, frame_lengths, all_layers)
        return torch.stack([masked_mean(h, frame_mask) for h in states], dim=1)

    def layer_sum(self, pooled_layers: torch.Tensor) -> torch.Tensor:
        """The head's input (B, H) from pooled states (B, K, H): their softmax-weighted sum
        (K = num_layers + 1), or the last layer's without the weighted layer sum."""
        if not self.config.use_weighted_layer_sum:
            return pooled_layers[:, -1]
        if pooled_layers.shape[1] != self.num_layer_states:
            raise ValueError(
                f"the weighted layer sum needs {self.num_layer_states} layer states, "
                f"got {pooled_layers.shape[1]}"
            )
        weights = torch.softmax(self.model.layer_weights, dim=-1).to(pooled_layers.dtype)
        return (pooled_layers * weights.view(1, -1, 1)).sum(dim=1)

    def head(self, pooled_layers: torch.Tensor) -> torch.Tensor:
        """Logits from pooled states (B, K, H); K = num_layers + 1 for the weighted sum."""
        pooled = (self.layer_sum(pooled_layers) - self.head_shift) / self.head_scale
        return self.model.classifier(self.head_dropout(self.model.projector(pooled)))

    # -- the head's input standardisation -------------------------------------------------
    @torch.no_grad()
    def standardize_head_inputs(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Train the head on ``(x - mean) / std`` of its input ``x`` (:meth:`layer_sum`); a
        constant feature (std 0) is only shifted.

        Mean-pooled hidden states vary little from clip to clip next to their offsets (the
        demo encoder: a spread of ~0.06 against means of ~0.3), so a head trained on them
        as they are underfits; standardised, the same steps reach a linear probe's fit."""
        self.head_shift.copy_(mean)
        self.head_scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    @torch.no_grad()
    def standard_model(self) -> PreTrainedModel:
        """``self.model`` with the head's input standardisation folded into its projector
        (``W / scale`` and ``b - W mean / scale``: the same logits up to rounding), so that
        the standard class computes them alone; the standardisation is then the identity."""
        projector = self.model.projector
        weight = projector.weight / self.head_scale.to(projector.weight.dtype)
        projector.bias.sub_(weight @ self.head_shift.to(weight.dtype))
        projector.weight.copy_(weight)
        self.head_shift.zero_()
        self.head_scale.fill_(1.0)
        return self.model

    def pooled_inputs(
        self,
        input_values: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        cnn_features: torch.Tensor | None = None,
        frame_lengths: torch.Tensor | None = None,
        pooled_layers: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled states (B, K, H) from one input kind (what :meth:`head` takes)."""
        given = [x is not None for x in (input_values, cnn_features, pooled_layers)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of input_values, cnn_features, pooled_layers")
        if pooled_layers is not None:
            return pooled_layers
        if cnn_features is None:
            cnn_features, frame_lengths = self.cnn_features(input_values, lengths)
        elif frame_lengths is None:
            frame_lengths = torch.full(
                (cnn_features.shape[0],), cnn_features.shape[1], device=cnn_features.device
            )
        return self.pooled_layer_states(
            cnn_features, frame_lengths, all_layers=self.config.use_weighted_layer_sum
        )

    def forward(
        self,
        input_values: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cnn_features: torch.Tensor | None = None,
        frame_lengths: torch.Tensor | None = None,
        pooled_layers: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        """Logits (and the cross-entropy loss when ``labels`` are given) from one input kind."""
        pooled_layers = self.pooled_inputs(
            input_values, lengths, cnn_features, frame_lengths, pooled_layers
        )
        logits = self.head(pooled_layers)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device))
        return SequenceClassifierOutput(loss=loss, logits=logits)


#: What a feature cache holds per clip: the CNN's output, or every layer mean-pooled.
CACHE_KINDS = ("cnn", "pooled")


@torch.no_grad()
def frozen_encoder_outputs(
    model: PartwiseClassifier, feature_extractor, waveform: np.ndarray, kind: str
) -> np.ndarray:
    """The cached value of one clip: (frames, channels) for ``cnn``, (layers, hidden) for
    ``pooled``; computed on the unpadded, normalised clip with the model in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.from_numpy(prepare_waveform(waveform, feature_extractor)).to(device)[None]
    feats, frames = model.cnn_features(x)
    if kind == "cnn":
        out = feats[0]
    elif kind == "pooled":
        out = model.pooled_layer_states(feats, frames, all_layers=True)[0]
    else:
        raise ValueError(f"kind must be one of {CACHE_KINDS}, got {kind!r}")
    model.train(was_training)
    return out.float().cpu().numpy()


def pooled_layer_features(
    encoder: str | os.PathLike, waveforms: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Every 16 kHz clip's mean-pooled hidden layers under the frozen ``encoder`` (a folder or
    hub id), concatenated: ((layers + 1) x hidden) floats each, the SVM's ``ssl`` features.
    The same values as the study's ``pooled`` feature cache (:func:`frozen_encoder_outputs`)."""
    model, fe = load_model(encoder, HEAD_CLASSES)
    runner = PartwiseClassifier(model, fe.return_attention_mask)
    return [frozen_encoder_outputs(runner, fe, w, "pooled").reshape(-1) for w in waveforms]


# -- loading, saving, inputs ------------------------------------------------------------------
def label_maps(class_names: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    id2label = dict(enumerate(class_names))
    return id2label, {name: i for i, name in id2label.items()}


def check_resolved(name_or_path: str | os.PathLike) -> None:
    """Refuse ``demo`` (the pre-trained demo encoder, a ``--model`` name): it must be resolved
    to its folder first; ``demo-random`` names the random-weight demo-size model."""
    if str(name_or_path) == DEMO_MODEL:
        raise ValueError(
            f"{DEMO_MODEL!r} names the pre-trained demo encoder: resolve it to its folder first "
            "(ser_ray.distributed.demo_encoder.resolve_model); for the demo-size model with "
            f"random weights use {RANDOM_DEMO_MODEL!r}"
        )


def load_feature_extractor(name_or_path: str | os.PathLike) -> Wav2Vec2FeatureExtractor:
    """The feature extractor saved with a model (``demo-random``:
    :func:`demo_feature_extractor`)."""
    check_resolved(name_or_path)
    if str(name_or_path) == RANDOM_DEMO_MODEL:
        return demo_feature_extractor()
    fe = AutoFeatureExtractor.from_pretrained(storage.node_local(name_or_path))
    if not isinstance(fe, Wav2Vec2FeatureExtractor):
        raise ValueError(
            f"{name_or_path}: expected a raw-waveform feature extractor "
            f"(Wav2Vec2FeatureExtractor), got {type(fe).__name__}"
        )
    return fe


def reset_head(model: PreTrainedModel, seed: int | None = None) -> None:
    """Initialise the head as the standard class does (layer weights, projector,
    classifier), optionally seeded."""
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        std = model.config.initializer_range
        for layer in (model.projector, model.classifier):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            nn.init.zeros_(layer.bias)
        if model.config.use_weighted_layer_sum:
            model.layer_weights.fill_(1.0 / model.layer_weights.numel())


def check_family(config: PretrainedConfig, source: str | os.PathLike) -> None:
    """Refuse encoders we cannot fine-tune as standard sequence classifiers."""
    if config.model_type not in FAMILIES:
        raise ValueError(
            f"{source} is a {config.model_type!r} model; --model takes a hub id or folder of "
            f"one of {', '.join(FAMILIES)} (base or large), or 'demo'"
        )
    if getattr(config, "add_adapter", False):
        raise ValueError(
            f"{source} has an adapter (add_adapter=True), which the sequence-classification "
            "classes do not support; use the encoder without its adapter"
        )


def _has_head(config: PretrainedConfig) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def _first(keys: Sequence[str], shown: int = 10) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > shown else ""
    return f"{list(keys[:shown])}{more}"


def check_loading_info(
    info: dict, model: PreTrainedModel, source: str | os.PathLike, has_head: bool
) -> None:
    """Stop on any encoder weight that did not load (missing, unexpected or of another shape);
    a missing head is expected only when the checkpoint has none."""
    prefix = f"{model.base_model_prefix}."
    encoder = model.base_model
    encoder_parts = {n for n, _ in encoder.named_children()}
    encoder_parts |= {n for n, _ in encoder.named_parameters(recurse=False)}

    def of_encoder(key: str) -> bool:  # checkpoints name keys with or without the prefix
        return key.startswith(prefix) or key.split(".")[0] in encoder_parts

    missing = sorted(info.get("missing_keys", ()))
    bad_missing = [k for k in missing if has_head or not k.startswith(HEAD_PARAMETERS)]
    bad_unexpected = sorted(k for k in info.get("unexpected_keys", ()) if of_encoder(k))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    problems = [
        f"{what}: {_first(keys)}"
        for what, keys in (
            ("missing (would be random)", bad_missing),
            ("unexpected (not used)", bad_unexpected),
            ("of another shape", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"{source}: the weights do not all load into {type(model).__name__} (config.json "
            f"says {model.config.model_type!r}); " + "; ".join(problems) + ". Check that "
            "config.json belongs to these weights (same family and sizes), or re-save the "
            "encoder with save_pretrained"
        )
    other = sorted(k for k in info.get("unexpected_keys", ()) if not of_encoder(k))
    if other:
        log.debug("%s: not used (pre-training or ASR head): %d tensors", source, len(other))


def load_model(
    name_or_path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    *,
    use_weighted_layer_sum: bool | None = None,
    freeze_feature_encoder: bool = True,
    seed: int | None = None,
    **config_overrides,
) -> tuple[PreTrainedModel, Wav2Vec2FeatureExtractor]:
    """The standard audio classifier and its feature extractor (hub id, folder or
    ``demo-random``: the demo-size model with the demo encoder's init seed; ``demo`` must be
    resolved first, see :func:`check_resolved`).

    ``class_names`` sets ``id2label``/``label2id``: a new head when the checkpoint has none
    (initialised with ``seed``); a checkpoint with a head must have these classes.
    ``config_overrides`` go to the config (e.g. ``mask_time_prob``). With the weighted
    layer sum LayerDrop is turned off (a skipped layer has no hidden state to weigh). A
    folder on a URI (a model published to the run location) is read from this node's copy.
    """
    name_or_path = storage.node_local(name_or_path)
    overrides = dict(config_overrides)
    if use_weighted_layer_sum is not None:
        overrides["use_weighted_layer_sum"] = use_weighted_layer_sum
    if class_names is not None:
        id2label, label2id = label_maps(class_names)
        overrides.update(num_labels=len(class_names), id2label=id2label, label2id=label2id)
    fe = load_feature_extractor(name_or_path)
    if str(name_or_path) == RANDOM_DEMO_MODEL:
        config, has_head = demo_config(**overrides), False
    else:
        config = AutoConfig.from_pretrained(str(name_or_path))
        check_family(config, name_or_path)
        has_head = _has_head(config)
        saved_labels = [config.id2label[i] for i in range(config.num_labels)]
        if has_head and class_names is not None and saved_labels != list(class_names):
            raise ValueError(
                f"{name_or_path} was trained for classes {saved_labels}, not "
                f"{list(class_names)}: set merge_calm to match the checkpoint, or start "
                "from its encoder (a checkpoint without a classification head)"
            )
        for key, value in overrides.items():
            setattr(config, key, value)
    if config.use_weighted_layer_sum and config.layerdrop > 0:
        log.info("LayerDrop %.2f off: the weighted layer sum needs every layer", config.layerdrop)
        config.layerdrop = 0.0
    if str(name_or_path) == RANDOM_DEMO_MODEL:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEMO_ENCODER_SEED)
            model = Wav2Vec2ForSequenceClassification(config)
    else:
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report: check_loading_info says it better
        try:
            model, info = AutoModelForAudioClassification.from_pretrained(
                str(name_or_path), config=config, output_loading_info=True
            )
        finally:
            hf_logging.set_verbosity(previous)
        check_loading_info(info, model, name_or_path, has_head)
    if not has_head:
        log.debug("%s: new %s head for %s", name_or_path, type(model).__name__, class_names)
        reset_head(model, seed)
    if freeze_feature_encoder:
        model.freeze_feature_encoder()
    return model, fe


def save_model(
    model: PreTrainedModel,
    feature_extractor: Wav2Vec2FeatureExtractor,
    out_dir: str | os.PathLike,
) -> Path:
    """Save as a Hugging Face checkpoint (safetensors + config + preprocessor config)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    feature_extractor.save_pretrained(out)
    return out


def prepare_waveform(
    waveform: np.ndarray, feature_extractor: Wav2Vec2FeatureExtractor
) -> np.ndarray:
    """One clip as the model expects it: float32, normalised over the unpadded clip if the
    feature extractor's ``do_normalize`` says so (its own formula)."""
    x = np.asarray(waveform, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected a mono waveform (1-D), got shape {x.shape}")
    if feature_extractor.do_normalize:
        x = feature_extractor.zero_mean_unit_var_norm([x], attention_mask=None)[0]
    return np.asarray(x, dtype=np.float32)


def pad_waveforms(
    waveforms: Sequence[np.ndarray], padding_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max_len) float32 batch padded with ``padding_value`` and lengths (B,) in samples."""
    lengths = torch.tensor([len(w) for w in waveforms], dtype=torch.long)
    batch = torch.full((len(waveforms), int(lengths.max())), padding_value, dtype=torch.float32)
    for i, w in enumerate(waveforms):
        batch[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return batch, lengths


#: Config attribute of a probe whose head takes pooled layers z-normalised per speaker.
SPEAKER_NORM_ATTR = "speaker_normalised_layers"


def takes_speaker_normalised_layers(model: PreTrainedModel) -> bool:
    """Whether ``model``'s head was trained on pooled layers z-normalised per speaker (a
    ``+probe+spknorm`` fold model): it needs every clip's speaker."""
    return bool(getattr(model.config, SPEAKER_NORM_ATTR, False))


@torch.no_grad()
def model_probabilities(
    model: PreTrainedModel,
    feature_extractor,
    waveforms: Sequence[np.ndarray],
    batch_size: int = 8,
    amp: str = "auto",
    speakers: Sequence[object] | None = None,
) -> np.ndarray:
    """Softmax probabilities (clips x classes) of one model (16 kHz mono waveforms), with
    autocast as ``amp`` (:func:`ser_ray.models.precision.resolve_amp`).

    A speaker-normalised probe (:func:`takes_speaker_normalised_layers`) needs ``speakers``
    (one per clip): its pooled layers are z-normalised over each speaker's clips first.
    """
    if takes_speaker_normalised_layers(model):
        return _speaker_normalised_probabilities(model, feature_extractor, waveforms, speakers)
    device = model.device
    dtype = resolve_amp(amp, device)
    exact_length = not pads_exactly(model.config, feature_extractor.return_attention_mask)
    probs = np.zeros((len(waveforms), model.config.num_labels), dtype=np.float64)
    for idx in inference_batches([len(w) for w in waveforms], batch_size, exact_length):
        inputs = feature_extractor(
            [np.asarray(waveforms[i], dtype=np.float32) for i in idx],
            sampling_rate=SAMPLE_RATE_HZ,
            padding=True,
            return_tensors="pt",
        ).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(**inputs).logits
        probs[idx] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
    return probs


def _speaker_normalised_probabilities(
    model: PreTrainedModel,
    feature_extractor,
    waveforms: Sequence[np.ndarray],
    speakers: Sequence[object] | None,
) -> np.ndarray:
    """A speaker-normalised probe's probabilities: every clip's pooled layers (one clip at a
    time, as the cache computed them), z-normalised over its speaker's clips, into the head.
    Raises :class:`ser_ray.features.speaker_norm.SpeakerNormError` without a speaker per clip
    or for a speaker with a single clip."""
    if speakers is None:
        raise SpeakerNormError(
            "this model (a +probe+spknorm fold model) takes pooled layers normalised over "
            "each speaker's clips: give the speaker of every clip"
        )
    runner = PartwiseClassifier(model, feature_extractor.return_attention_mask).eval()
    pooled = np.stack([frozen_encoder_outputs(runner, feature_extractor, w, "pooled")
                       for w in waveforms])  # fmt: skip
    flat = speaker_normalize(pooled.reshape(len(pooled), -1), speakers)
    layers = torch.from_numpy(flat.reshape(pooled.shape).astype(np.float32)).to(model.device)
    logits = runner(pooled_layers=layers).logits
    return torch.softmax(logits.double(), dim=-1).cpu().numpy()
