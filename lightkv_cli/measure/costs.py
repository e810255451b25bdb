"""Analytic costs from a text-decoder config: prefill FLOPs (attention + MLP) from the per-layer
sequence lengths actually processed, KV bytes per cached token, and capacity (how many concurrent
requests fit in a memory budget next to the weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch


def _decoder_config(config: Any) -> Any:
    """The text-decoder config: ``config.get_text_config(decoder=True)`` when available, else ``config``."""
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            return get_text_config(decoder=True)
        except TypeError:
            return get_text_config()
    return config


def _attention_dims(text_config: Any) -> tuple[int, int, int, int]:
    """(hidden_size D, num_attention_heads H, num_key_value_heads H_kv, head_dim d)."""
    hidden = int(text_config.hidden_size)
    heads = int(text_config.num_attention_heads)
    kv_heads = getattr(text_config, "num_key_value_heads", None)
    kv_heads = heads if kv_heads is None else int(kv_heads)
    head_dim = getattr(text_config, "head_dim", None)
    head_dim = hidden // heads if head_dim is None else int(head_dim)
    return hidden, heads, kv_heads, head_dim


def prefill_flops(text_config: Any, seq_lens: Sequence[int], batch_size: int = 1) -> int:
    """Analytic FLOPs of a prefill through the decoder layers (multiply-add = 2 FLOPs).

    Decoder layer ``l`` processes ``seq_lens[l]`` tokens (lets a method that drops tokens
    between layers report its saving). With ``n`` tokens, ``D = hidden_size``,
    ``H = num_attention_heads``, ``H_kv = num_key_value_heads`` (default ``H``),
    ``d = head_dim`` (else ``D // H``), ``I = intermediate_size``, one layer costs:

    * q, k, v, o projections: ``2·n·D·(H·d) + 2·2·n·D·(H_kv·d) + 2·n·(H·d)·D``
    * causal attention, counting only the ``n(n+1)/2`` visible query-key pairs:
      ``2·2·H·d·n(n+1)/2`` (scores QKᵀ and the weighted sum of V)
    * gated MLP (gate, up, down): ``3·2·n·D·I``

    The sum over layers is multiplied by ``batch_size``, and the LM head for the last
    position only is added: ``2·D·vocab_size·batch_size``. Not counted: the vision encoder
    and projector, embeddings, norms, softmax, rotary embeddings, activations, residual adds.

    Args:
        text_config: a text-decoder config (e.g. ``LlamaConfig``); a multimodal config with
            ``get_text_config()`` is also accepted.
        seq_lens: tokens processed by each decoder layer, length ``num_hidden_layers``.
        batch_size: sequences in the batch (each with these lengths), ≥ 1.

    Returns:
        FLOPs as an int.

    Raises:
        ValueError: if ``len(seq_lens) != num_hidden_layers``, a length is negative, or
            ``batch_size < 1``.
    """
    config = _decoder_config(text_config)
    num_layers = int(config.num_hidden_layers)
    if len(seq_lens) != num_layers:
        raise ValueError(f"seq_lens has {len(seq_lens)} entries but the model has {num_layers} decoder layers")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    hidden, heads, kv_heads, head_dim = _attention_dims(config)
    intermediate = int(config.intermediate_size)
    vocab = int(config.vocab_size)

    total = 0
    for layer, n in enumerate(seq_lens):
        n = int(n)
        if n < 0:
            raise ValueError(f"seq_lens[{layer}] is negative ({n})")
        projections = (
            2 * n * hidden * (heads * head_dim)
            + 2 * 2 * n * hidden * (kv_heads * head_dim)
            + 2 * n * (heads * head_dim) * hidden
        )
        attention = 2 * 2 * heads * head_dim * (n * (n + 1) // 2)
        mlp = 3 * 2 * n * hidden * intermediate
        total += projections + attention + mlp
    return total * batch_size + 2 * hidden * vocab * batch_size


def kv_bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    """Bytes of K and V cached for one token in one decoder layer: ``2·H_kv·d·element_size``.

    Args:
        text_config: a text-decoder config (``num_key_value_heads``, ``head_dim`` or
            ``hidden_size // num_attention_heads``); multimodal configs are unwrapped with
            ``get_text_config()``.
        dtype: the cache's element dtype (e.g. ``torch.float16`` → 2 bytes).

    Returns:
        Bytes per token per layer, as an int.
    """
    _, _, kv_heads, head_dim = _attention_dims(_decoder_config(text_config))
    return 2 * kv_heads * head_dim * dtype.itemsize


def max_concurrent_requests(
    memory_bytes: int,
    weight_bytes: int,
    kv_bytes_per_request: float,
    reserve_bytes: int = 0,
) -> int:
    """How many requests' KV caches fit in the memory left beside the weights.

    ``floor((memory_bytes − weight_bytes − reserve_bytes) / kv_bytes_per_request)``, or 0 when
    the weights and reserve alone do not fit. This is an upper bound: it ignores allocator
    fragmentation, the CUDA context, and per-request buffers other than the KV cache.

    Args:
        memory_bytes: the memory budget (e.g. the GPU's total memory), bytes, ≥ 0.
        weight_bytes: bytes held by the model weights, ≥ 0.
        kv_bytes_per_request: K+V bytes one request holds (prefill plus generated tokens), > 0.
        reserve_bytes: bytes kept free for other work, e.g. the activation memory of a
            prefill, ≥ 0.

    Returns:
        The number of requests, an int ≥ 0.

    Raises:
        ValueError: if ``kv_bytes_per_request`` is not a finite number > 0, or a byte count
            is negative.
    """
    if not math.isfinite(kv_bytes_per_request) or kv_bytes_per_request <= 0:
        raise ValueError(f"kv_bytes_per_request must be a finite number > 0, got {kv_bytes_per_request}")
    for name, value in (
        ("memory_bytes", memory_bytes),
        ("weight_bytes", weight_bytes),
        ("reserve_bytes", reserve_bytes),
    ):
        if value < 0:
            raise ValueError(f"{name} must be ≥ 0, got {value}")
    free = int(memory_bytes) - int(weight_bytes) - int(reserve_bytes)
    if free <= 0:
        return 0
    # Exact division of the number as written (repr: 0.1 is 1/10, not the binary float just
    # above it), so floor(3 / 0.1) is 30, and float rounding can never add a request.
    kv = Fraction(repr(float(kv_bytes_per_request)))
    return math.floor(Fraction(free) / kv)
