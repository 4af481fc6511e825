"""wav2vec 2.0 emotion classifier: a pretrained encoder plus a pooling head.

The encoder comes from ``from_pretrained(name_or_path)`` (a hub id such as
``facebook/wav2vec2-base`` or a local folder) or, for the offline default ``demo``, from a
demo-size :func:`demo_config` with random weights (a fixed init seed, so that "demo" always
names the same encoder, like a pretrained checkpoint does).

The head (Pepino et al. 2021): an optional learnable softmax-weighted sum of all hidden
layers (the CNN-projected input of the transformer plus every layer's output), masked mean
pooling over the valid frames of each clip, then ``dropout -> Linear -> ReLU -> dropout ->
Linear``. Pooling happens before any non-linearity, so it commutes with the layer sum; that
lets the probe-mode feature cache store one pooled vector per layer and clip.

The forward pass takes one of three inputs, so that the cached and uncached paths share
everything after the cached part (and DDP wraps a single ``forward``):

- ``input_values`` (waveforms, padded) + ``lengths`` (samples): the full model. With a
  group-norm CNN (wav2vec2-base) the CNN runs per clip on the unpadded waveform, because
  group norm over time sees the padding; with a layer-norm CNN (large-lv60 style) it runs
  batched, which is exact for the valid frames.
- ``cnn_features`` (B, T, C, padded) + ``frame_lengths``: the frozen CNN's output.
- ``pooled_layers`` (B, num_layers + 1, H): mean-pooled hidden states of every layer
  (probe mode, whole encoder frozen).

The feature extractor's ``do_normalize`` is honoured per clip by :func:`prepare_waveform`
(zero mean, unit variance over the unpadded clip) and its ``return_attention_mask`` decides
whether the transformer gets an attention mask (``config.use_attention_mask``). Pooling
always uses the valid frames.
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
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    Wav2Vec2Model,
    Wav2Vec2PreTrainedModel,
)

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
SAMPLE_RATE_HZ = 16_000
#: Init seed of the demo encoder: "demo" names one fixed random encoder.
DEMO_ENCODER_SEED = 0


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


def masked_mean(hidden: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean over time (dim 1) of ``hidden`` (B, T, H) over the frames where ``frame_mask``."""
    weights = frame_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def frame_mask_from_lengths(frame_lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Bool mask (B, T): True on the first ``frame_lengths[b]`` frames."""
    steps = torch.arange(num_frames, device=frame_lengths.device)
    return steps.unsqueeze(0) < frame_lengths.unsqueeze(1)


class Wav2Vec2EmotionClassifier(Wav2Vec2PreTrainedModel):
    """wav2vec2 encoder + (weighted layer sum) + masked mean pooling + MLP head.

    Config fields used besides the encoder's: ``num_labels``/``id2label``/``label2id``,
    ``use_weighted_layer_sum``, ``classifier_proj_size`` (head width), ``head_dropout``
    (default 0.1) and ``use_attention_mask`` (default: True for a layer-norm CNN).
    """

    def __init__(self, config: Wav2Vec2Config):
        super().__init__(config)
        if getattr(config, "add_adapter", False):
            raise ValueError("the emotion classifier does not support wav2vec2 adapters")
        self.wav2vec2 = Wav2Vec2Model(config)
        self.num_layer_states = config.num_hidden_layers + 1
        if config.use_weighted_layer_sum:
            self.layer_weights = nn.Parameter(torch.zeros(self.num_layer_states))
        dropout = float(getattr(config, "head_dropout", 0.1))
        self.head_dropout = nn.Dropout(dropout)
        self.projector = nn.Linear(config.hidden_size, config.classifier_proj_size)
        self.classifier = nn.Linear(config.classifier_proj_size, config.num_labels)
        self._encoder_frozen = False
        self.post_init()

    # -- init, freezing -------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self and self.config.use_weighted_layer_sum:
            # equal softmax weights for every layer at the start
            nn.init.zeros_(self.layer_weights)

    def reset_head(self, seed: int | None = None) -> None:
        """Re-initialise the head (layer weights, projector, classifier), optionally seeded."""
        ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with ctx:
            if seed is not None:
                torch.manual_seed(seed)
            std = self.config.initializer_range
            for layer in (self.projector, self.classifier):
                nn.init.normal_(layer.weight, mean=0.0, std=std)
                nn.init.zeros_(layer.bias)
            if self.config.use_weighted_layer_sum:
                nn.init.zeros_(self.layer_weights)

    @property
    def use_attention_mask(self) -> bool:
        default = self.config.feat_extract_norm == "layer"
        return bool(getattr(self.config, "use_attention_mask", default))

    def freeze_feature_encoder(self) -> None:
        """Freeze the CNN feature encoder (as in the wav2vec 2.0 paper's fine-tuning)."""
        self.wav2vec2.freeze_feature_encoder()

    @property
    def feature_encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.wav2vec2.feature_extractor.parameters())

    def freeze_encoder(self) -> None:
        """Probe mode: freeze the whole encoder and keep it in eval mode (no dropout)."""
        for p in self.wav2vec2.parameters():
            p.requires_grad = False
        self.wav2vec2.feature_extractor._requires_grad = False
        self._encoder_frozen = True
        self.wav2vec2.eval()

    def set_transformer_trainable(self, trainable: bool) -> None:
        """(Un)freeze the transformer part (feature projection + encoder), not the CNN."""
        if self._encoder_frozen:
            return
        for p in self.transformer_parameters():
            p.requires_grad = trainable

    def transformer_parameters(self) -> Iterator[nn.Parameter]:
        """Encoder parameters other than the CNN's (projection, transformer, mask embedding)."""
        cnn = {id(p) for p in self.wav2vec2.feature_extractor.parameters()}
        return (p for p in self.wav2vec2.parameters() if id(p) not in cnn)

    def head_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return (
            (name, p) for name, p in self.named_parameters() if not name.startswith("wav2vec2.")
        )

    def train(self, mode: bool = True) -> Wav2Vec2EmotionClassifier:
        super().train(mode)
        if self._encoder_frozen:
            self.wav2vec2.eval()
        return self

    # -- the pieces of the forward pass ---------------------------------------------------
    def frame_lengths(self, lengths_samples: torch.Tensor) -> torch.Tensor:
        """Valid CNN frames of clips with ``lengths_samples`` samples."""
        return self._get_feat_extract_output_lengths(lengths_samples).to(torch.long)

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
        cnn = self.wav2vec2.feature_extractor
        grad = torch.is_grad_enabled() and not self.feature_encoder_frozen
        with torch.set_grad_enabled(grad):
            if self.config.feat_extract_norm == "group":
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
        """Transformer hidden states from CNN features: ([last] or [input, layer 1..L]), mask."""
        w2v = self.wav2vec2
        frame_mask = frame_mask_from_lengths(
            frame_lengths.to(cnn_features.device), cnn_features.shape[1]
        )
        hidden, _ = w2v.feature_projection(cnn_features)
        attention_mask = frame_mask if self.use_attention_mask else None
        hidden = w2v._mask_hidden_states(hidden, attention_mask=attention_mask)
        # padded frames carry zeros into the transformer (the encoder does the same with a mask)
        hidden = hidden * frame_mask.unsqueeze(-1).to(hidden.dtype)
        if not all_layers:
            return [
                w2v.encoder(hidden, attention_mask=attention_mask).last_hidden_state
            ], frame_mask
        captured: dict[int, torch.Tensor] = {}

        def keep(index: int):
            def hook(_module, _args, output):
                captured[index] = output[0] if isinstance(output, tuple) else output

            return hook

        # the encoder's dropout output is the input of layer 1 (after positional conv)
        hooks = [w2v.encoder.dropout.register_forward_hook(keep(0))]
        hooks += [
            layer.register_forward_hook(keep(i)) for i, layer in enumerate(w2v.encoder.layers, 1)
        ]
        try:
            last = w2v.encoder(hidden, attention_mask=attention_mask).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        states = []
        for i in range(self.num_layer_states - 1):
            states.append(captured.get(i, states[-1] if states else hidden))  # LayerDrop skips
        states.append(last)  # with stable layer norm: after the final layer norm
        return states, frame_mask

    def pooled_layer_states(
        self, cnn_features: torch.Tensor, frame_lengths: torch.Tensor, all_layers: bool = True
    ) -> torch.Tensor:
        """Mean-pooled hidden states (B, K, H): K = num_layers + 1, or 1 (last layer only)."""
        states, frame_mask = self.layer_states(cnn_features, frame_lengths, all_layers)
        return torch.stack([masked_mean(h, frame_mask) for h in states], dim=1)

    def head(self, pooled_layers: torch.Tensor) -> torch.Tensor:
        """Logits from pooled states (B, K, H); K = num_layers + 1 for the weighted sum."""
        if self.config.use_weighted_layer_sum:
            if pooled_layers.shape[1] != self.num_layer_states:
                raise ValueError(
                    f"the weighted layer sum needs {self.num_layer_states} layer states, "
                    f"got {pooled_layers.shape[1]}"
                )
            weights = torch.softmax(self.layer_weights, dim=0).to(pooled_layers.dtype)
            pooled = (pooled_layers * weights.view(1, -1, 1)).sum(dim=1)
        else:
            pooled = pooled_layers[:, -1]
        hidden = torch.relu(self.projector(self.head_dropout(pooled)))
        return self.classifier(self.head_dropout(hidden))

    def forward(
        self,
        input_values: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cnn_features: torch.Tensor | None = None,
        frame_lengths: torch.Tensor | None = None,
        pooled_layers: torch.Tensor | None = None,
        **_unused,
    ) -> SequenceClassifierOutput:
        """Logits (and the cross-entropy loss when ``labels`` are given) from one input kind."""
        given = [x is not None for x in (input_values, cnn_features, pooled_layers)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of input_values, cnn_features, pooled_layers")
        if pooled_layers is None:
            if cnn_features is None:
                cnn_features, frame_lengths = self.cnn_features(input_values, lengths)
            elif frame_lengths is None:
                frame_lengths = torch.full(
                    (cnn_features.shape[0],), cnn_features.shape[1], device=cnn_features.device
                )
            pooled_layers = self.pooled_layer_states(
                cnn_features, frame_lengths, all_layers=self.config.use_weighted_layer_sum
            )
        logits = self.head(pooled_layers)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device))
        return SequenceClassifierOutput(loss=loss, logits=logits)


# -- loading, saving, inputs ------------------------------------------------------------------
def label_maps(class_names: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    id2label = dict(enumerate(class_names))
    return id2label, {name: i for i, name in id2label.items()}


def load_feature_extractor(name_or_path: str | os.PathLike) -> Wav2Vec2FeatureExtractor:
    """The feature extractor saved with a model (``demo``: :func:`demo_feature_extractor`)."""
    if str(name_or_path) == DEMO_MODEL:
        return demo_feature_extractor()
    return Wav2Vec2FeatureExtractor.from_pretrained(str(name_or_path))


def load_model(
    name_or_path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    *,
    use_weighted_layer_sum: bool | None = None,
    head_dropout: float | None = None,
    freeze_feature_encoder: bool = True,
    probe: bool = False,
    seed: int | None = None,
    feature_extractor: Wav2Vec2FeatureExtractor | None = None,
    **config_overrides,
) -> tuple[Wav2Vec2EmotionClassifier, Wav2Vec2FeatureExtractor]:
    """The classifier and its feature extractor from a hub id, a local folder or ``demo``.

    ``class_names`` sets ``id2label``/``label2id`` (a new head when the checkpoint has none;
    a checkpoint of ours must have the same classes). ``seed`` seeds a freshly initialised
    head. ``config_overrides`` go to the config (e.g. ``mask_time_prob``, ``layerdrop``).
    """
    overrides = dict(config_overrides)
    if use_weighted_layer_sum is not None:
        overrides["use_weighted_layer_sum"] = use_weighted_layer_sum
    if head_dropout is not None:
        overrides["head_dropout"] = head_dropout
    fe = feature_extractor or load_feature_extractor(name_or_path)
    overrides["use_attention_mask"] = bool(fe.return_attention_mask)
    if class_names is not None:
        id2label, label2id = label_maps(class_names)
        overrides.update(num_labels=len(class_names), id2label=id2label, label2id=label2id)
    if str(name_or_path) == DEMO_MODEL:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEMO_ENCODER_SEED)
            model = Wav2Vec2EmotionClassifier(demo_config(**overrides))
        model.reset_head(seed)
    else:
        saved = Wav2Vec2Config.from_pretrained(str(name_or_path))
        saved_labels = list(saved.id2label.values()) if saved.id2label else []
        is_ours = getattr(saved, "ser_ray_classifier", False)
        if is_ours and class_names is not None and saved_labels != list(class_names):
            raise ValueError(
                f"{name_or_path} was trained for classes {saved_labels}, not {list(class_names)}"
            )
        overrides.pop("num_labels", None)  # follows id2label
        for key, value in overrides.items():  # custom keys too (head_dropout, ...)
            setattr(saved, key, value)
        ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with ctx:
            if seed is not None:
                torch.manual_seed(seed)
            model = Wav2Vec2EmotionClassifier.from_pretrained(str(name_or_path), config=saved)
    model.config.ser_ray_classifier = True
    if freeze_feature_encoder or probe:
        model.freeze_feature_encoder()
    if probe:
        model.freeze_encoder()
    return model, fe


def save_model(
    model: Wav2Vec2EmotionClassifier,
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


def encoder_batch_inputs(
    waveforms: Sequence[np.ndarray], feature_extractor: Wav2Vec2FeatureExtractor
) -> dict[str, torch.Tensor]:
    """Model inputs for raw clips: per-clip normalisation, then dynamic padding."""
    prepared = [prepare_waveform(w, feature_extractor) for w in waveforms]
    values, lengths = pad_waveforms(prepared, feature_extractor.padding_value)
    return {"input_values": values, "lengths": lengths}
