"""FastV: drop the least-attended vision tokens once, early in the decoder, during prefill.

Implements "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024, arXiv 2403.06764)
from its definition in ``shared/docs/METHODS.md`` §3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightkv_cli.errors import UserError
from lightkv_cli.methods.attention import expand_kv, post_rope_qk
from lightkv_cli.methods.base import POSITION_MODES, SequencePress, StageInput, StageOutput
from lightkv_cli.models.adapters import FamilyAdapter, adapter_for

_FLOOR_EPS = 1e-9


def drop_lowest(inp: StageInput, scores: torch.Tensor, n_drop: int) -> StageOutput:
    """The stage that drops every row's ``n_drop`` droppable vision tokens with the lowest ``scores``
    (FastV, PyramidDrop): special tokens are never dropped; ties go to the earlier token.

    Args:
        inp: the stage's input.
        scores: ``(B, n)`` float32 score of each vision token (recorded as the stage's guidance).
        n_drop: tokens dropped per row, ``≥ 1`` (a host int).
    """
    B, S, _ = inp.hidden.shape
    vis = inp.vision
    ranked = scores.masked_fill(~vis.mergeable, float("inf"))
    order = torch.sort(ranked, dim=1, stable=True).indices[:, :n_drop]
    keep = torch.ones(B, S, dtype=torch.bool, device=inp.hidden.device)
    keep.scatter_(1, vis.positions.gather(1, order), False)
    return StageOutput(keep=keep, removed=n_drop, hidden=inp.hidden, guidance=scores)


@dataclass
class FastV(SequencePress):
    """FastV (ECCV 2024): before decoder layer ``K``, drop the vision tokens the last prompt token
    attends to least at layer ``K − 1``.

    Score of vision token ``i`` = causal attention from the last prompt token to ``i`` at layer
    ``K − 1`` (post-RoPE, softmax over all visible keys), averaged over heads. The
    ``⌊ratio·n⌋`` lowest-scoring vision tokens are dropped (special tokens inside a vision run, such
    as a CLS token, are never dropped); survivors keep their positions. Layers ``< K`` cache the full
    prompt, layers ``≥ K`` the shorter one, so vision retention is ``(K + (L − K)(1 − ratio))/L``.

    Args:
        layer: ``K ≥ 1`` (2 in the paper), at most ``L − 1``.
        ratio: ``R``, fraction of the vision tokens dropped, in ``[0, 1]`` (0.5 in the paper).
        positions: ``"keep"`` (default) or ``"renumber"`` (1-D RoPE families only).

    Raises:
        UserError: invalid parameters, or ``layer`` beyond the model's depth.
    """

    layer: int = 2
    ratio: float = 0.5
    positions: str = "keep"
    expected_retention: float | None = field(default=None, compare=False)
    schedule_note: str = field(default="", compare=False)
    _fixed_scores: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.layer, self.ratio = int(self.layer), float(self.ratio)
        if self.layer < 1:
            raise UserError(f"FastV layer K must be ≥ 1 (tokens are scored at layer K-1), got {self.layer}")
        if math.isnan(self.ratio) or not (0.0 <= self.ratio <= 1.0):
            raise UserError(f"FastV ratio must be in [0, 1], got {self.ratio}")
        if self.positions not in POSITION_MODES:
            raise UserError(f"positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")

    @property
    def needs_qk(self) -> bool:  # type: ignore[override]
        """Whether the scoring layer's query/key projections must be captured."""
        return self._fixed_scores is None

    def describe(self) -> dict:
        """Parameters for results files."""
        return {
            "layer": self.layer,
            "ratio": round(self.ratio, 6),
            "positions": self.positions,
            "schedule_note": self.schedule_note,
        }

    def stage_layers(self, num_layers: int) -> list[int]:
        """The scoring layer ``K − 1`` (none when ``ratio`` is 0)."""
        return [self.layer - 1] if self.ratio > 0 else []

    def validate(self, adapter: FamilyAdapter) -> None:
        """Raise ``UserError`` when ``K`` leaves no layer to compress."""
        L = adapter.num_layers
        if self.layer > L - 1:
            raise UserError(
                f"FastV layer K={self.layer} leaves no layer to compress: this model has {L} decoder layers"
            )

    def dropped(self, n: int) -> int:
        """Vision tokens dropped out of ``n`` droppable ones: ``⌊ratio·n⌋``."""
        return int(math.floor(self.ratio * n + _FLOOR_EPS))

    def predict(self, model: nn.Module, grids: Sequence[tuple[int, int]] | None = None, special: int = 0) -> list[int]:
        """Predicted vision tokens cached by each decoder layer (length ``L``); sets :attr:`expected_retention`.

        Args:
            model: the model (depth; its representative image when ``grids`` is None).
            grids: the ``(rows, cols)`` grids of an actual input (e.g. ``press.last_prefill.grids``);
                default: one representative image of the family.
            special: never-dropped vision tokens besides the grids (newlines, CLS), with ``grids``.

        Raises:
            UserError: as :meth:`validate`.
        """
        adapter = adapter_for(model)
        self.validate(adapter)
        if grids is None:
            n = adapter.vision_tokens_per_image()
            rows, cols = adapter.image_grid()
            special = n - rows * cols
        else:
            n = sum(r * c for r, c in grids) + special
        after = n - self.dropped(n - special)
        L = adapter.num_layers
        counts = [n if i < self.layer or self.ratio == 0 else after for i in range(L)]
        self.expected_retention = sum(counts) / (L * n)
        return counts

    @classmethod
    def for_retention(cls, retention: float, model: nn.Module, layer: int = 2, positions: str = "keep") -> FastV:
        """FastV at layer ``K`` whose drop ratio gives average vision retention closest to ``retention``.

        ``ratio = (1 − retention)·L/(L − K)·n/m`` (``n`` vision tokens of the family's representative image,
        ``m`` of them droppable: LLaVA-NeXT's newlines are kept), then the closest achievable count.

        Raises:
            UserError: ``retention`` outside ``(0, 1]`` or below ``K / L`` (what FastV keeps at most).
        """
        if math.isnan(retention) or not (0.0 < retention <= 1.0):
            raise UserError(f"retention must be in (0, 1], got {retention}")
        adapter = adapter_for(model)
        L = adapter.num_layers
        probe = cls(layer=layer, ratio=0.0, positions=positions)
        probe.validate(adapter)
        lowest = layer / L
        if retention < lowest - 1e-9:
            raise UserError(
                f"target retention {retention:g} is below the lowest FastV reaches with K={layer} on this "
                f"{L}-layer model ({lowest:.3f}: layers before K keep every vision token); choose a larger target"
            )
        # the share of the droppable tokens to drop so that all n vision tokens (never-dropped ones such as
        # LLaVA-NeXT's newlines counted as kept) average ``retention``: n/m of the share when all are droppable
        grids, special = adapter.prediction_grids()
        m = sum(r * c for r, c in grids)
        n = m + special
        ratio = min(1.0, (1.0 - retention) * L / (L - layer) * n / max(1, m))
        press = cls(layer=layer, ratio=round(ratio, 6), positions=positions)
        press.predict(model)
        press.schedule_note = (
            f"drop {press.ratio:.4f} of the vision tokens before layer {layer} of {L}, solved for target {retention:g}"
        )
        return press

    def with_fixed_scores(self, scores: torch.Tensor) -> FastV:
        """A copy that ranks vision tokens by the given ``(B, n)`` scores instead of attention.

        Replaying ``press.last_prefill.stages[0].guidance`` on a longer input (prompt + generated
        tokens) drops the same tokens, which is how cached decoding is checked against an uncached
        reference forward.
        """
        new = dataclasses.replace(self)
        new._fixed_scores = scores.clone()
        return new

    def replay(self) -> FastV:
        """A copy that drops the last prefill's tokens again: its recorded scores (see
        :meth:`SequencePress.replay`; the last token of a longer input attends differently).

        Raises:
            RuntimeError: no prefill ran under this press yet.
        """
        rec = self.last_prefill
        if rec is None:
            raise RuntimeError("replay() needs a prefill under this press first")
        return self.with_fixed_scores(rec.stages[0].guidance) if rec.stages else self

    def reduce(self, inp: StageInput) -> StageOutput | None:
        """Score every row's vision tokens by the last token's attention; drop the lowest ones.

        Every row drops ``⌊ratio·n⌋`` of its droppable tokens, ``n`` the smallest row's count (rows
        must keep the same number); the counts are known on the host, so the stage reads nothing back.
        """
        vis = inp.vision
        n_drop = self.dropped(min(vis.mergeable_counts))
        if n_drop == 0:
            return None
        return drop_lowest(inp, self._scores(inp), n_drop)  # scores: (B, n) float32

    def _scores(self, inp: StageInput) -> torch.Tensor:
        B = inp.hidden.shape[0]
        n = inp.vision.count
        if self._fixed_scores is not None:
            if tuple(self._fixed_scores.shape) != (B, n):
                raise ValueError(f"fixed scores have shape {tuple(self._fixed_scores.shape)}, expected {(B, n)}")
            return self._fixed_scores.to(device=inp.hidden.device, dtype=torch.float32)
        q, k = post_rope_qk(inp, self._adapter)  # (B, H, S, d), (B, H_kv, S, d)
        k = expand_kv(k, q.shape[1])
        scale = float(getattr(inp.module.self_attn, "scaling", q.shape[-1] ** -0.5))
        logits = torch.matmul(q[:, :, -1:], k.transpose(-1, -2)).squeeze(2) * scale  # (B, H, S)
        real = inp.attention_mask_2d.bool().to(logits.device)
        logits = logits.masked_fill(~real.unsqueeze(1), float("-inf"))
        probs = torch.softmax(logits, dim=-1).mean(dim=1)  # (B, S)
        return probs.gather(1, inp.vision.positions)
