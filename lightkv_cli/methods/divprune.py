"""DivPrune: keep the most diverse vision tokens of each image, before the decoder.

Implements "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al.,
CVPR 2025, arXiv 2503.02175) from its definition in ``shared/docs/METHODS.md`` §5.3 (not from the
authors' code, whose limits — batch 1, a hard-coded system-prompt length, configuration through
environment variables, the O(k²n) recomputation — are not reproduced).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightkv_cli.methods.prellm import InputPress, check_share, rounded_count
from lightkv_cli.methods.vision import compact

#: The published setting (``SUBSET_RATIO``): 56 of LLaVA-1.5's 576 tokens, actual R = 0.097.
PUBLISHED_RATIO = 0.098
#: Distance entries computed at once when looking for the first token (bounds the memory of that step).
_CHUNK_ELEMENTS = 1 << 24
#: Distance matrices up to this many entries (``B·m²``, float32: 256 MiB) are computed once.
_FULL_ELEMENTS = 1 << 26


def max_min_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity selection of ``k`` of ``m`` tokens, for every batch row at once.

    With ``D_ij = 1 − cos(x_i, x_j)`` (float32): ``s₀ = argmax_j min_{i≠j} D_ij``, then
    ``s_t = argmax_{j∉S} min_{i∈S} D_ij``, the minimum kept as a running ``(B, m)`` vector updated with one
    row ``D[s_t]`` per step; ties go to the lowest index. When ``B·m²`` entries fit in
    :data:`_FULL_ELEMENTS`, ``D`` is computed once with ``−inf`` on its diagonal, so a chosen token's own row
    takes it out of the running minimum (the chosen set is where the minimum is ``−inf``) and a step is three
    ops writing into buffers allocated once (argmax, gather a row, minimum), whatever ``B``; otherwise each
    step computes its row (O(m) memory per row) and the first step reads ``D`` in column chunks, never
    ``k×m×m``.

    Args:
        features: ``(B, m, D)`` one visual input's token features (any float dtype).
        k: tokens to keep, ``1 ≤ k``; ``k ≥ m`` keeps all.

    Returns:
        ``(B, k)`` long indices into ``m``, ascending (all ``m`` when ``k ≥ m``). No host read.
    """
    B, m, _ = features.shape
    device = features.device
    if k >= m:
        return torch.arange(m, device=device).expand(B, -1).clone()
    x = F.normalize(features.float(), dim=-1)  # (B, m, D)
    eye = torch.arange(m, device=device)
    if B * m * m <= _FULL_ELEMENTS:
        d = 1.0 - torch.matmul(x, x.transpose(1, 2))  # (B, m, m)
        d[:, eye, eye] = float("inf")
        s = d.amin(dim=1).argmax(dim=1, keepdim=True)  # (B, 1)
        d[:, eye, eye] = float("-inf")  # a chosen token's row removes it from the running minimum
        rows = s.view(B, 1, 1).expand(B, 1, m)  # a view of s: it follows every in-place argmax below
        run = torch.gather(d, 1, rows).view(B, m)  # (B, m): min over the chosen of D[i, j]; −inf if chosen
        row = torch.empty(B, 1, m, device=device)
        flat_row = row.view(B, m)
        for _ in range(k - 1):  # three kernels a step, no allocation: argmax, gather, minimum
            torch.argmax(run, dim=1, keepdim=True, out=s)
            torch.gather(d, 1, rows, out=row)
            torch.minimum(run, flat_row, out=run)
        return compact(torch.isneginf(run), k)
    col_min = torch.empty(B, m, device=device)
    step = max(1, _CHUNK_ELEMENTS // max(1, B * m))
    for a in range(0, m, step):
        c = min(step, m - a)
        d = 1.0 - torch.matmul(x, x[:, a : a + c].transpose(1, 2))  # (B, m, c): D[i, j] for j in the chunk
        d[:, eye[a : a + c], torch.arange(c, device=device)] = float("inf")  # i == j
        col_min[:, a : a + c] = d.amin(dim=1)
    chosen = torch.zeros(B, m, dtype=torch.bool, device=device)
    s = col_min.argmax(dim=1)  # (B,)
    run = torch.full((B, m), float("inf"), device=device)
    rows = torch.arange(B, device=device)
    for t in range(k):
        chosen[rows, s] = True
        if t == k - 1:
            break
        row = 1.0 - torch.matmul(x, x[rows, s].unsqueeze(-1)).squeeze(-1)  # (B, m): D[s, j]
        run = torch.minimum(run, row)
        s = run.masked_fill(chosen, float("-inf")).argmax(dim=1)
    return compact(chosen, k)


@dataclass
class DivPrune(InputPress):
    """DivPrune (arXiv 2503.02175): before decoder layer 0, keep the ``k = round(R·m)`` most diverse of
    each visual input's ``m`` vision tokens, drop the rest.

    For each image (or video) of each row, ``X`` = its ``(m, D)`` projector outputs as the decoder would
    receive them (special tokens such as LLaVA-NeXT's newlines or a CLS token are not candidates and are
    always kept); the kept tokens are the greedy max-min selection of :func:`max_min_select` on
    ``D_ij = 1 − cos(X_i, X_j)``, in sequence order. ``k = round(R·m)`` with Python's ``round`` (at least
    1). Every layer caches ``k`` of the ``m`` tokens, so the retention is ``R ≈ k/m`` (special tokens count
    as kept). The published setting is ``SUBSET_RATIO = 0.098``: 56 of LLaVA-1.5's 576 tokens, actual
    ``R = 0.097``. Prefill compute falls in every decoder layer; the vision tower runs unchanged.

    Args:
        subset_ratio: ``R``, the share of each input's droppable tokens kept, in ``(0, 1]`` (0.098 in the
            paper; 1 keeps everything).
        positions: ``"keep"`` (default: kept tokens keep their positions, Qwen's their M-RoPE ids) or
            ``"renumber"`` (contiguous positions, as the published LLaVA code; 1-D RoPE families only).

    Attributes:
        expected_retention: predicted average vision retention (:meth:`predict`, :meth:`for_retention`).
        schedule_note: how :meth:`for_retention` chose the ratio.

    Raises:
        UserError: ``subset_ratio`` outside ``(0, 1]`` or an unknown ``positions``.
    """

    subset_ratio: float = PUBLISHED_RATIO
    positions: str = "keep"
    expected_retention: float | None = field(default=None, compare=False)
    schedule_note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.subset_ratio = self._checked(self.subset_ratio, "DivPrune subset_ratio")

    def describe(self) -> dict:
        """Parameters for results files."""
        return {
            "subset_ratio": round(self.subset_ratio, 6),
            "positions": self.positions,
            "schedule_note": self.schedule_note,
        }

    def kept_count(self, m: int, grids: Sequence[tuple[int, int]] = (), special: int = 0) -> int:
        """``round(R·(m + special)) − special``, at least 1 (:func:`~lightkv_cli.methods.prellm.rounded_count`)."""
        return rounded_count(self.subset_ratio, m, special)

    def select(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """The greedy max-min selection (:func:`max_min_select`)."""
        return max_min_select(features, k)

    @classmethod
    def for_retention(cls, retention: float, model: nn.Module, positions: str = "keep") -> DivPrune:
        """DivPrune keeping the share ``retention`` of each input's tokens in every layer
        (``SUBSET_RATIO = R``; the measured ``R`` differs from it by rounding only).

        Raises:
            UserError: ``retention`` outside ``(0, 1]``.
        """
        check_share(retention, "retention")
        press = cls(subset_ratio=round(retention, 9), positions=positions)
        press.predict(model)
        press.schedule_note = f"SUBSET_RATIO {press.subset_ratio:g} before layer 0, for target {retention:g}"
        return press
