"""Prompt-guidance weights for LightKV's weighted merge (METHODS.md §1, step 5).

Each vision token ``i`` gets a weight ``g_i``; a surviving B token becomes the ``g``-weighted mean
of itself and the A tokens merged into it. All functions work in float32 on post-RoPE queries and
keys and never materialise an ``S×S`` attention matrix, so the model keeps its SDPA / flash
attention; they process key (or query) chunks so that at most ``max_chunk_bytes`` of logits exist
at once.

Shapes: ``q`` is ``(H, S, d)``, ``k`` is ``(H_kv, S, d)`` for one batch row; GQA keys are shared by
their group of ``H / H_kv`` query heads.
"""

from __future__ import annotations

import torch

from lightkv_cli.methods.attention import MAX_CHUNK_BYTES, expand_kv

GUIDANCE_MODES = ("cross", "prompt", "uniform")


def cross_guidance(
    q: torch.Tensor,
    k: torch.Tensor,
    text: torch.Tensor,
    real: torch.Tensor,
    scale: float,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> torch.Tensor:
    """Cross-modality guidance, the published LightKV definition, for one row.

    With logits ``ℓ[h, i, j] = q_i · k_j · scale`` for every (non-padding) query position ``i`` and
    every non-vision (text) key ``j``, softmax over the **query** axis ``i`` (no causal mask), then
    ``g_i = Σ_h Σ_j softmax_i(ℓ)[h, i, j]``.

    Args:
        q: ``(H, S, d)`` float32 post-RoPE queries.
        k: ``(H_kv, S, d)`` float32 post-RoPE keys.
        text: ``(S,)`` bool, the keys ``j`` (non-vision, non-padding tokens).
        real: ``(S,)`` bool, non-padding positions (the queries ``i``).
        scale: logit scale, ``1/√d`` for standard attention.
        max_chunk_bytes: memory bound for one chunk of logits.

    Returns:
        ``(S,)`` float32 weights for every position (callers read the vision positions); padding
        positions get 0. Work: ``2·H·S·|T|·d`` FLOPs, memory ``H·S·chunk·4`` bytes.
    """
    H, S, _ = q.shape
    g = torch.zeros(S, dtype=torch.float32, device=q.device)
    keys = expand_kv(k[:, text], H, dim=0)  # (H, T, d)
    T = keys.shape[1]
    if T == 0:
        return g
    chunk = max(1, int(max_chunk_bytes // (4 * H * S)))
    neg = ~real
    for j0 in range(0, T, chunk):
        logits = torch.matmul(q, keys[:, j0 : j0 + chunk].transpose(1, 2)) * scale  # (H, S, Tc)
        logits.masked_fill_(neg.view(1, S, 1), float("-inf"))
        g += torch.softmax(logits, dim=1).sum(dim=(0, 2))
    return g


def prompt_guidance(
    q: torch.Tensor,
    k: torch.Tensor,
    vision: torch.Tensor,
    real: torch.Tensor,
    scale: float,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> torch.Tensor | None:
    """Prompt guidance: the ordinary causal attention that the text after the images pays to each token.

    Queries are the non-padding tokens after the last vision token; each attends (row softmax) to
    the non-padding keys at or before it; the weights are averaged over heads and queries.

    Args:
        q: ``(H, S, d)`` float32 post-RoPE queries.
        k: ``(H_kv, S, d)`` float32 post-RoPE keys.
        vision: ``(S,)`` bool, vision-token positions.
        real: ``(S,)`` bool, non-padding positions.
        scale: logit scale.

    Returns:
        ``(S,)`` float32 weights, or None when no text follows the last vision token (the caller
        then merges with uniform weights).
    """
    H, S, _ = q.shape
    vis_pos = torch.nonzero(vision).flatten()
    if vis_pos.numel() == 0:
        return None
    after = torch.arange(S, device=q.device) > vis_pos.max()
    qpos = torch.nonzero(after & real).flatten()
    if qpos.numel() == 0:
        return None
    keys = expand_kv(k, H, dim=0)  # (H, S, d)
    g = torch.zeros(S, dtype=torch.float32, device=q.device)
    chunk = max(1, int(max_chunk_bytes // (4 * H * S)))
    kpos = torch.arange(S, device=q.device)
    for i0 in range(0, qpos.numel(), chunk):
        qi = qpos[i0 : i0 + chunk]
        logits = torch.matmul(q[:, qi], keys.transpose(1, 2)) * scale  # (H, Tc, S)
        visible = (kpos.view(1, -1) <= qi.view(-1, 1)) & real.view(1, -1)
        logits.masked_fill_(~visible.unsqueeze(0), float("-inf"))
        g += torch.softmax(logits, dim=-1).sum(dim=(0, 1))
    return g / (H * qpos.numel())
