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


def _scalar(value: float) -> torch.Tensor:
    """A 0-dim float32 host tensor: multiplying a device tensor by it is one op (a Python float
    costs a dtype conversion of the wrapped scalar each time) and never synchronises."""
    return torch.scalar_tensor(value, dtype=torch.float32)


def _grouped(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(B, H, c, d)`` → ``(B·H_kv, G·c, d)``: the ``G = H / H_kv`` query heads that share a key head
    side by side, so one ``bmm`` against the un-repeated keys gives every head's logits (head ``h``
    uses key head ``h // G``, as :func:`~lightkv_cli.methods.attention.expand_kv`)."""
    B, H, c, d = x.shape
    return x.reshape(B * num_kv_heads, (H // num_kv_heads) * c, d)


def cross_guidance_batched(
    q: torch.Tensor,
    k: torch.Tensor,
    text_positions: torch.Tensor,
    real: torch.Tensor,
    scale: float,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> torch.Tensor:
    """:func:`cross_guidance` for every row of a batch at once, with no host synchronisation.

    Keys are every row's non-vision positions (the same number ``T`` in every row; padding keys
    among them carry weight 0). Grouped-query heads share their key head without repeating it.
    A fixed number of ops per chunk of keys, whatever ``B``.

    Args:
        q: ``(B, H, S, d)`` float32 post-RoPE queries.
        k: ``(B, H_kv, S, d)`` float32 post-RoPE keys.
        text_positions: ``(B, T)`` long, the non-vision positions of every row.
        real: ``(B, S)`` bool, non-padding positions (the queries ``i``).
        scale: logit scale.
        max_chunk_bytes: memory bound for one chunk of logits.

    Returns:
        ``(B, S)`` float32 weights (callers read the vision positions); padding positions get 0.
    """
    B, H, S, d = q.shape
    H_kv = k.shape[1]
    T = text_positions.shape[1]
    if T == 0:
        return torch.zeros(B, S, dtype=torch.float32, device=q.device)
    weight = real.gather(1, text_positions).to(torch.float32)  # padding keys count for nothing
    keys = k.gather(2, text_positions.view(B, 1, T, 1).expand(-1, H_kv, -1, d))  # (B, H_kv, T, d)
    keys_t = keys.view(B * H_kv, T, d).transpose(1, 2)  # (B·H_kv, d, T)
    queries = _grouped(q, H_kv)  # (B·H_kv, G·S, d)
    scale_t = _scalar(scale)
    pad = (~real).view(B, 1, S, 1)
    chunk = max(1, int(max_chunk_bytes // (4 * B * H * S)))
    g = None
    for j0 in range(0, T, chunk):
        logits = torch.bmm(queries, keys_t[:, :, j0 : j0 + chunk]).view(B, H, S, -1) * scale_t  # (B, H, S, Tc)
        logits.masked_fill_(pad, float("-inf"))
        part = (torch.softmax(logits, dim=2) * weight[:, j0 : j0 + chunk].view(B, 1, 1, -1)).sum(dim=(1, 3))
        g = part if g is None else g + part
    return g


def prompt_guidance_batched(
    q: torch.Tensor,
    k: torch.Tensor,
    last_vision: torch.Tensor,
    real: torch.Tensor,
    num_after: int,
    scale: float,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> torch.Tensor:
    """:func:`prompt_guidance` for every row of a batch at once, with no host synchronisation.

    Queries are each row's non-padding tokens after its last vision token, found among the last
    ``num_after`` positions of every row; only those queries' logits are computed. Grouped-query
    heads share their key head without repeating it. A fixed number of ops per chunk of queries,
    whatever ``B``.

    Args:
        q: ``(B, H, S, d)`` float32 post-RoPE queries.
        k: ``(B, H_kv, S, d)`` float32 post-RoPE keys.
        last_vision: ``(B,)`` long, the position of each row's last vision token.
        real: ``(B, S)`` bool, non-padding positions.
        num_after: an upper bound on any row's tokens after its last vision token (a host int).
        scale: logit scale.
        max_chunk_bytes: memory bound for one chunk of logits.

    Returns:
        ``(B, S)`` float32 weights; a row with no text after its images gets 1 everywhere (the
        uniform weights :func:`prompt_guidance`'s callers fall back to).
    """
    B, H, S, d = q.shape
    H_kv = k.shape[1]
    T = max(0, min(num_after, S))
    if T == 0:
        return torch.ones(B, S, dtype=torch.float32, device=q.device)
    pos = torch.arange(S, device=q.device)
    qpos = pos[S - T :]  # (T,) the same candidate positions in every row
    # (B, T) 1 for the row's queries: after its last vision token and not padding
    is_query = ((qpos.view(1, -1) > last_vision.view(-1, 1)) & real[:, S - T :]).to(torch.float32)
    keys_t = k.reshape(B * H_kv, S, d).transpose(1, 2)  # (B·H_kv, d, S)
    scale_t = _scalar(scale)
    pad = (~real).view(B, 1, 1, S)
    chunk = max(1, int(max_chunk_bytes // (4 * B * H * S)))
    g = None
    for i0 in range(0, T, chunk):
        c = min(chunk, T - i0)
        qc = _grouped(q[:, :, S - T + i0 : S - T + i0 + c], H_kv)  # (B·H_kv, G·c, d)
        logits = torch.bmm(qc, keys_t).view(B, H, c, S) * scale_t  # (B, H, c, S)
        logits.masked_fill_(pos.view(1, -1) > qpos[i0 : i0 + c].view(-1, 1), _NEG)  # causal
        logits.masked_fill_(pad, _NEG)
        # _NEG, not -inf: a padding query that sees no key gets finite (uniform) probabilities,
        # zeroed by its is_query weight; a row with a visible key gets exactly the -inf result.
        part = (torch.softmax(logits, dim=-1) * is_query[:, i0 : i0 + c].view(B, 1, c, 1)).sum(dim=(1, 2))
        g = part if g is None else g + part
    n_q = is_query.sum(dim=1, keepdim=True)  # (B, 1)
    return torch.where(n_q > 0, g / (n_q * _scalar(H)), 1.0)


_NEG = torch.finfo(torch.float32).min
