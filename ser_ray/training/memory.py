"""Peak accelerator memory of fine-tuning one fold, estimated from the model's config.

What a training step holds at its peak, in bytes:

- **weights** (every parameter, float32: AMP autocasts, it keeps float32 weights),
  **gradients** (trainable parameters, float32) and **AdamW state** (two float32 moments per
  trainable parameter);
- **activations** the forward pass saves for backward, at the longest clip of a batch
  (a batch is padded to it). Per transformer layer and frame, about ``40 H + 12 I + 16`` bytes
  in float32 (``H`` hidden size, ``I`` feed-forward size: the inputs of the q/k/v, output and
  feed-forward projections, GELU and dropout masks, layer-norm statistics), plus the attention
  probabilities, ``12 A T`` bytes per frame (``A`` heads, ``T`` frames: scores, softmax and
  dropout) unless attention is fused (flash / memory-efficient kernels keep only a
  log-sum-exp per head and frame). Outside the layers: ``20 H + 8 C`` bytes per frame (``C``
  the CNN's last width: feature projection, positional convolution, final norm) and the
  positional convolution's weight-normed kernel. A trainable CNN saves about 10 bytes (group
  norm, wav2vec2-base) or 12 (layer norm, large) per element of every conv layer's output.
  These coefficients were read off ``torch.autograd.graph.saved_tensors_hooks`` on CPU;
  ``tests/test_memory_estimate.py`` checks them against that count on other configs. Under
  AMP the saved activations are taken as half of float32 (matmul inputs in 16 bits, norms in
  32): an assumption until ``jobs/benchmark.py gpu`` measures it on a device;
- the **frozen CNN's transient** when it runs in the step (no feature cache): it saves
  nothing, but while it runs one layer's input and two copies of its output (conv, then norm
  or GELU) are alive; the transformer's activations are not yet, so the peak is the larger of
  the two.

The model, optimizer state and activations of the head are small and left out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FLOAT32 = 4  # bytes


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one fine-tuning step holds at its peak (:func:`estimate_finetune_memory`)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    cnn_transient: int

    @property
    def total(self) -> int:
        static = self.weights + self.gradients + self.optimizer
        return static + max(self.activations, self.cnn_transient)

    def line(self) -> str:
        gib = {k: v / 2**30 for k, v in dataclasses.asdict(self).items()}
        return (
            f"estimated peak {self.total / 2**30:.2f} GiB: weights {gib['weights']:.2f}, "
            f"gradients {gib['gradients']:.2f}, AdamW {gib['optimizer']:.2f}, activations "
            f"{gib['activations']:.2f}, CNN transient {gib['cnn_transient']:.2f}"
        )


def conv_output_lengths(config: Any, samples: int) -> list[int]:
    """Output length of every CNN layer for a clip of ``samples`` samples."""
    lengths, length = [], samples
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        length = (length - kernel) // stride + 1
        lengths.append(length)
    return lengths


def estimate_finetune_memory(
    config: Any,
    n_params: int,
    n_trainable: int,
    batch_size: int,
    max_samples: int,
    amp: bool = False,
    fused_attention: bool = False,
    cnn_in_step: bool = True,
    cnn_trainable: bool = False,
) -> MemoryEstimate:
    """The estimate (module doc) for a wav2vec2-style ``config`` with ``n_params`` parameters of
    which ``n_trainable`` train, batches of ``batch_size`` clips padded to ``max_samples``.
    ``cnn_in_step``: the CNN runs in the step (False with the feature cache);
    ``fused_attention``: flash / memory-efficient attention (CUDA's SDPA), no ``T x T``
    probabilities saved."""
    lengths = conv_output_lengths(config, max_samples)
    frames, tokens = lengths[-1], batch_size * lengths[-1]
    hidden, inner, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    per_token = 40 * hidden + 12 * inner + 16
    attention = 4 * heads if fused_attention else 12 * heads * frames
    layers = config.num_hidden_layers * tokens * (per_token + attention)
    outside = tokens * (20 * hidden + 8 * config.conv_dim[-1])
    groups = config.num_conv_pos_embedding_groups
    pos_kernel = FLOAT32 * hidden * (hidden // groups) * config.num_conv_pos_embeddings
    activations = layers + outside
    if amp:
        activations //= 2
    activations += pos_kernel
    widths = [1, *config.conv_dim]  # channels into and out of each CNN layer
    cnn_transient = 0
    if cnn_in_step and cnn_trainable:
        per_element = 12 if config.feat_extract_norm == "layer" else 10
        outputs = sum(w * n for w, n in zip(config.conv_dim, lengths, strict=True))
        activations += batch_size * outputs * per_element
    elif cnn_in_step:
        inputs = [max_samples, *lengths[:-1]]
        cnn_transient = (
            FLOAT32
            * batch_size
            * max(
                w_in * n_in + 2 * w_out * n_out
                for w_in, n_in, w_out, n_out in zip(
                    widths[:-1], inputs, widths[1:], lengths, strict=True
                )
            )
        )
    return MemoryEstimate(
        weights=FLOAT32 * n_params,
        gradients=FLOAT32 * n_trainable,
        optimizer=2 * FLOAT32 * n_trainable,
        activations=activations,
        cnn_transient=cnn_transient,
    )


def estimate_for_model(model: Any, batch_size: int, max_samples: int, **options) -> MemoryEstimate:
    """:func:`estimate_finetune_memory` for a built ``torch.nn.Module`` with a ``config``
    (its parameters counted; ``cnn_trainable`` read from it unless given)."""
    params = list(model.parameters())
    options.setdefault(
        "cnn_trainable",
        any(p.requires_grad for n, p in model.named_parameters() if "feature_extractor" in n),
    )
    return estimate_finetune_memory(
        model.config,
        n_params=sum(p.numel() for p in params),
        n_trainable=sum(p.numel() for p in params if p.requires_grad),
        batch_size=batch_size,
        max_samples=max_samples,
        **options,
    )
