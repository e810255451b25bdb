"""Attention that a method needs to see, reconstructed beside the model's own (SDPA / flash) attention.

The model never materialises attention probabilities, so methods that score tokens by attention
rebuild what they need from the layer's own projections: post-RoPE queries and keys
(:func:`post_rope_qk` for a whole prompt, :func:`rope_queries` for a few observation positions), in
float32, and causal attention rows of a few queries over every key (:func:`attention_rows`), chunked so
that at most :data:`MAX_CHUNK_BYTES` of probabilities exist at once and never an ``S×S`` matrix.

Used by LightKV's guidance and FastV's scores (in-prefill) and by VL-Cache and SnapKV (post-prefill
eviction). The rotary function is the family's (``FamilyAdapter.rotary_function``: 1-D RoPE or M-RoPE).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lightkv_cli.methods.base import StageInput
    from lightkv_cli.models.adapters import FamilyAdapter

#: Largest block of attention logits or probabilities materialised at once (bytes).
MAX_CHUNK_BYTES = 64 * 2**20


def expand_kv(k: torch.Tensor, num_heads: int, dim: int = 1) -> torch.Tensor:
    """Repeat each key/value head for its group of query heads (grouped-query attention).

    Args:
        k: keys with ``H_kv`` heads on axis ``dim``: ``(B, H_kv, S, d)`` (``dim=1``) or ``(H_kv, S, d)``
            for one batch row (``dim=0``).
        num_heads: query heads ``H``, a multiple of ``H_kv``.
        dim: the head axis.

    Returns:
        The same tensor when ``H == H_kv``, else ``H`` heads on axis ``dim`` (head ``h`` is KV head
        ``h // (H / H_kv)``).
    """
    groups = num_heads // k.shape[dim]
    return k if groups == 1 else k.repeat_interleave(groups, dim=dim)


def _heads(x: torch.Tensor, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    """``(B, S, h·d)`` projection output → ``(B, h, S, d)`` float32, the layer's per-head norm (if any) first."""
    x = x.view(x.shape[0], x.shape[1], -1, head_dim)
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2).float()


def post_rope_qk(inp: StageInput, adapter: FamilyAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE float32 queries and keys of a stage layer over the whole current sequence.

    From the layer's captured ``q_proj`` / ``k_proj`` outputs (``inp.queries``, ``inp.keys``:
    ``(B, S, H·d)`` and ``(B, S, H_kv·d)``), with the layer's ``q_norm`` / ``k_norm`` if it has them and
    the family's rotary function at ``inp.position_embeddings``, as the layer's attention computes them.

    Returns:
        ``(q, k)``: ``(B, H, S, d)`` and ``(B, H_kv, S, d)`` float32.

    Raises:
        RuntimeError: the projections were not captured (the press did not set ``needs_qk``).
    """
    if inp.queries is None or inp.keys is None:
        raise RuntimeError("internal error: q_proj/k_proj outputs were not captured for guidance")
    attn = inp.module.self_attn
    d = attn.head_dim
    q = _heads(inp.queries, d, getattr(attn, "q_norm", None))
    k = _heads(inp.keys, d, getattr(attn, "k_norm", None))
    cos, sin = inp.position_embeddings
    rotary = adapter.rotary_function(inp.layer)
    q, k = rotary(q, k, cos.float(), sin.float())
    return q, k


def rope_queries(
    adapter: FamilyAdapter, layer: int, attn: nn.Module, q_out: torch.Tensor, qpos: torch.Tensor, position_embeddings
) -> torch.Tensor:
    """Post-RoPE float32 queries of ``layer`` at a few prompt positions.

    Args:
        adapter: the model's family adapter (its rotary function).
        layer: the decoder layer.
        attn: the layer's attention module (``head_dim``, optional ``q_norm``).
        q_out: ``(B, S, H·d)`` output of the layer's ``q_proj``.
        qpos: ``(τ,)`` long positions.
        position_embeddings: ``(cos, sin)`` as the layer received them (sequence on axis -2).

    Returns:
        ``(B, H, τ, d)`` float32.
    """
    q = _heads(q_out[:, qpos.to(q_out.device)], attn.head_dim, getattr(attn, "q_norm", None))
    cos, sin = position_embeddings
    idx = qpos.to(cos.device)
    cos, sin = cos[..., idx, :].float(), sin[..., idx, :].float()
    rotary = adapter.rotary_function(layer)
    return rotary(q, q, cos, sin)[0]


def attention_rows(
    q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, scale: float, max_chunk_bytes: int = MAX_CHUNK_BYTES
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Causal attention probabilities of the observation queries, in chunks of queries.

    ``A[b, h, i, j] = softmax_j(q_i·k_j·scale)`` over the keys ``j ≤ qpos[i]`` (float32).

    Args:
        q: ``(B, H, τ, d)`` post-RoPE queries at positions ``qpos``.
        k: ``(B, H_kv, S, d)`` post-RoPE keys of the whole prompt.
        qpos: ``(τ,)`` long positions of the queries in the prompt.
        scale: logit scale (``1/√d``).
        max_chunk_bytes: memory bound of one chunk of probabilities.

    Yields:
        ``(probs, visible)``: ``(B, H, c, S)`` float32 probabilities (0 where not visible) and the
        ``(c, S)`` bool causal visibility, for consecutive chunks of ``c`` queries.
    """
    B, H, tau, _ = q.shape
    S = k.shape[2]
    keys = expand_kv(k.float(), H)
    chunk = max(1, int(max_chunk_bytes // (4 * B * H * S)))
    kpos = torch.arange(S, device=q.device)
    for i0 in range(0, tau, chunk):
        qi = qpos[i0 : i0 + chunk]
        logits = torch.matmul(q[:, :, i0 : i0 + chunk].float(), keys.transpose(-1, -2)) * scale  # (B, H, c, S)
        visible = kpos.view(1, -1) <= qi.view(-1, 1)
        logits.masked_fill_(~visible.view(1, 1, *visible.shape), float("-inf"))
        yield torch.softmax(logits, dim=-1), visible
