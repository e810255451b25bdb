"""PyramidDrop: drop vision tokens in stages, keeping a geometric share ``λ^s`` at stage ``s``.

Implements "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction" (Xing et al., arXiv 2410.17247) from its definition in ``shared/docs/METHODS.md`` §5.4 (not
from the authors' code: here grouped-query attention, several images, left padding and batches work).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightkv_cli.errors import UserError
from lightkv_cli.methods.attention import expand_kv
from lightkv_cli.methods.base import POSITION_MODES, SequencePress, StageInput, StageOutput
from lightkv_cli.methods.fastv import drop_lowest
from lightkv_cli.models.adapters import FamilyAdapter, adapter_for

#: The paper's boundaries [8, 16, 24] as fractions of LLaVA-1.5-7B's 32 layers.
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)
_FLOOR_EPS = 1e-9


def default_boundaries(num_layers: int) -> list[int]:
    """The paper's [8, 16, 24] scaled to ``L`` layers: ``⌊f·L + ½⌋`` for ``f`` in 1/4, 1/2, 3/4.

    32 layers give [8, 16, 24], 28 (Qwen2.5-VL-7B) [7, 14, 21], 16 [4, 8, 12], 12 [3, 6, 9].

    Raises:
        UserError: ``L < 4`` (no three distinct boundaries inside the decoder).
    """
    if num_layers < 4:
        raise UserError(
            f"PyramidDrop's default boundaries need at least 4 decoder layers, this model has {num_layers}: "
            "give explicit boundaries (layers=[...])"
        )
    return [math.floor(f * num_layers + 0.5) for f in DEFAULT_FRACTIONS]


def retention_of(boundaries: Sequence[int], ratio: float, num_layers: int) -> float:
    """``R = [l₁ + Σ_s (l_{s+1} − l_s)·λ^s + (L − l_S)·λ^S] / L``, ignoring floor effects."""
    edges = [*boundaries, num_layers]
    total = boundaries[0] + sum((edges[s + 1] - edges[s]) * ratio ** (s + 1) for s in range(len(boundaries)))
    return total / num_layers


@dataclass
class PyramidDrop(SequencePress):
    """PyramidDrop (arXiv 2410.17247): at each stage boundary ``l_s``, keep the ``⌊m·λ^s⌋`` vision tokens
    the last prompt token attends to most.

    At boundary ``ℓ = l_s`` (``s = 1, 2, …``), on layer ``ℓ``'s input ``h`` (``(B, S, D)``, the output of
    layer ``ℓ − 1``: what a pre-hook of layer ``ℓ`` sees), for every batch row at once:

    1. ``x = layers[ℓ].input_layernorm(h)``; ``q = RoPE(W_q x)`` of the last prompt token only
       (``(B, H, 1, d)``) and ``K = RoPE(W_k x)`` of every token (``(B, H_kv, S, d)``, repeated to ``H``
       heads), at the current positions, float32.
    2. ``a_j = mean_h softmax_j(q_h·K_hᵀ/√d)`` over the last token's full causal row (padding masked).
    3. Keep the ``⌊m·λ^s⌋`` (at least 1) highest-scoring droppable vision tokens, ``m`` counted on the
       original prompt (576 → 288 → 144 → 72 for LLaVA-1.5 at λ = 0.5), in sequence order. Special
       tokens inside a vision run (LLaVA-NeXT newlines) are never dropped.

    Layer ``ℓ`` then runs on the shorter sequence (layer ``ℓ − 1`` cached the longer one). So
    ``R = [l₁ + (l₂ − l₁)λ + (l₃ − l₂)λ² + (L − l₃)λ³]/L`` (floors aside); the paper's default
    (``[8, 16, 24]``, ``λ = 0.5`` on LLaVA-1.5-7B) is ``R = 15/32 = 0.469``, and ``[8, 16, 24]`` cannot go
    below ``R = 0.25``.

    Positions: the paper renumbers the shorter sequence ``0 … S' − 1`` and shifts decoding back by the
    tokens removed (``positions="renumber"`` here, 1-D RoPE families only); the default ``"keep"`` keeps the
    survivors' original positions, as every other method here, and works on M-RoPE families.

    Args:
        layers: boundaries ``l_s``, strictly increasing, each in ``[1, L − 1]``; default (None): the paper's
            [8, 16, 24] scaled to the model (:func:`default_boundaries`).
        ratio: ``λ`` in ``[0, 1]`` (0.5 in the paper); 1 keeps everything (no stage runs).
        positions: ``"keep"`` (default) or ``"renumber"`` (the paper's; 1-D RoPE families only).

    Attributes:
        expected_retention: predicted average vision retention (:meth:`predict`, :meth:`for_retention`).
        schedule_note: how :meth:`for_retention` chose ``λ``.

    Raises:
        UserError: invalid parameters, or boundaries that do not fit the model's depth.
    """

    layers: Sequence[int] | None = None
    ratio: float = 0.5
    positions: str = "keep"
    expected_retention: float | None = field(default=None, compare=False)
    schedule_note: str = field(default="", compare=False)
    _fixed_scores: dict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ratio = float(self.ratio)
        if math.isnan(self.ratio) or not (0.0 <= self.ratio <= 1.0):
            raise UserError(f"PyramidDrop ratio λ must be in [0, 1], got {self.ratio}")
        if self.layers is not None:
            self.layers = [int(x) for x in self.layers]
            if not self.layers or self.layers[0] < 1 or any(b <= a for a, b in zip(self.layers, self.layers[1:])):
                raise UserError(
                    f"PyramidDrop boundaries must be strictly increasing layers ≥ 1, got {list(self.layers)}"
                )
        if self.positions not in POSITION_MODES:
            raise UserError(f"positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")

    def boundaries(self, num_layers: int) -> list[int]:
        """The stage boundaries ``l_s`` for an ``L``-layer model."""
        return list(self.layers) if self.layers is not None else default_boundaries(num_layers)

    def describe(self) -> dict:
        """Parameters for results files."""
        return {
            "layers": None if self.layers is None else list(self.layers),
            "ratio": round(self.ratio, 6),
            "positions": self.positions,
            "schedule_note": self.schedule_note,
        }

    def stage_layers(self, num_layers: int) -> list[int]:
        """The layers ``l_s − 1`` after which a stage runs (none when ``λ`` is 1)."""
        return [] if self.ratio >= 1.0 else [b - 1 for b in self.boundaries(num_layers)]

    def validate(self, adapter: FamilyAdapter) -> None:
        """Raise ``UserError`` when a boundary lies beyond the model's last layer."""
        L = adapter.num_layers
        bounds = self.boundaries(L)
        if bounds[-1] > L - 1:
            raise UserError(
                f"PyramidDrop boundary {bounds[-1]} is beyond this model's last layer ({L} decoder layers): "
                f"choose boundaries ≤ {L - 1}"
            )

    def kept(self, m: int, stage: int) -> int:
        """Droppable vision tokens kept after stage ``s`` (1-based) out of the prompt's ``m``: ``⌊m·λ^s⌋``, ≥ 1."""
        if self.ratio >= 1.0 or m == 0:
            return m
        return min(m, max(1, math.floor(m * self.ratio**stage + _FLOOR_EPS)))

    def predict(self, model: nn.Module, grids: Sequence[tuple[int, int]] | None = None, special: int = 0) -> list[int]:
        """Predicted vision tokens cached by each decoder layer (length ``L``); sets :attr:`expected_retention`.

        Args:
            model: the model (depth; its representative image when ``grids`` is None).
            grids: the ``(rows, cols)`` grids of an actual input (e.g. ``press.last_prefill.grids``);
                default: one representative image of the family.
            special: never-dropped vision tokens besides the grids, with ``grids``.

        Raises:
            UserError: as :meth:`validate`.
        """
        adapter = adapter_for(model)
        self.validate(adapter)
        if grids is None:
            grids, special = adapter.prediction_grids()
        n = sum(r * c for r, c in grids) + special
        L = adapter.num_layers
        counts = [n] * L
        for s, b in enumerate(self.boundaries(L), start=1):
            for i in range(b, L):
                counts[i] = special + self.kept(n - special, s)
        self.expected_retention = sum(counts) / (L * n)
        return counts

    @classmethod
    def for_retention(
        cls, retention: float, model: nn.Module, layers: Sequence[int] | None = None, positions: str = "keep"
    ) -> PyramidDrop:
        """PyramidDrop on ``layers`` (default: :func:`default_boundaries`) with ``λ`` solved for ``retention``.

        ``λ`` is found by bisection on the retention :meth:`predict` gives for the family's representative
        image (its floors, and never-dropped tokens such as LLaVA-NeXT's newlines counted as kept), the nearer
        of the two counts around the target. The paper's unpublished 192/128/64-token rows were advised
        (PyramidDrop#29) as boundaries such as [2, 8, 16] with a solved ``λ``: ``λ = 0.19`` gives
        ``R ≈ 0.111`` on 32 layers.

        Raises:
            UserError: ``retention`` outside ``(0, 1]``, or at or below ``l₁ / L`` (layers before the first
                boundary keep every vision token).
        """
        if math.isnan(retention) or not (0.0 < retention <= 1.0):
            raise UserError(f"retention must be in (0, 1], got {retention}")
        adapter = adapter_for(model)
        L = adapter.num_layers
        probe = cls(layers=layers, ratio=1.0, positions=positions)
        probe.validate(adapter)
        bounds = probe.boundaries(L)
        lowest = bounds[0] / L
        if retention <= lowest + 1e-9:
            raise UserError(
                f"target retention {retention:g} is at or below what PyramidDrop reaches with boundaries {bounds} "
                f"on this {L}-layer model ({lowest:.3f}: layers before {bounds[0]} keep every vision token); "
                "choose a larger target or an earlier first boundary"
            )

        def predicted(lam: float) -> float:  # the family's representative image, special tokens kept
            probe = cls(layers=layers, ratio=lam, positions=positions)
            probe.predict(model)
            return probe.expected_retention

        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if predicted(mid) < retention:
                lo = mid
            else:
                hi = mid
        if retention >= 1.0:
            ratio = 1.0
        else:  # the nearer of the two counts around the target
            ratio = round(hi if abs(predicted(hi) - retention) <= abs(predicted(lo) - retention) else lo, 6)
        press = cls(layers=layers, ratio=ratio, positions=positions)
        press.predict(model)
        press.schedule_note = (
            f"λ = {press.ratio:.4f} at boundaries {bounds} of {L} layers, solved for target {retention:g}"
        )
        return press

    def with_fixed_scores(self, scores: dict[int, torch.Tensor]) -> PyramidDrop:
        """A copy that ranks vision tokens by the given scores instead of attention.

        Args:
            scores: stage layer (``l_s − 1``) → ``(B, n_s)`` scores of that stage's vision tokens (a
                record's guidance).
        """
        new = dataclasses.replace(self)
        new._fixed_scores = {int(k): v.clone() for k, v in scores.items()}
        return new

    def replay(self) -> PyramidDrop:
        """A copy that drops the last prefill's tokens again: its recorded per-stage scores (the last token
        of a longer input attends differently; see :meth:`SequencePress.replay`).

        Raises:
            RuntimeError: no prefill ran under this press yet.
        """
        rec = self.last_prefill
        if rec is None:
            raise RuntimeError("replay() needs a prefill under this press first")
        return self.with_fixed_scores({s.layer: s.guidance for s in rec.stages}) if rec.stages else self

    def reduce(self, inp: StageInput) -> StageOutput | None:
        """Keep each row's top-scoring vision tokens of this stage (guidance: the ``(B, n_s)`` scores).

        Every row drops the same number (counted on the smallest row); the counts are host ints, so the
        stage reads nothing back from the device.
        """
        vis = inp.vision
        L = self._adapter.num_layers
        stage = self.stage_layers(L).index(inp.layer) + 1
        removed_so_far = vis.layouts[0].count - vis.count
        m_now = min(vis.mergeable_counts)
        n_drop = m_now - self.kept(m_now + removed_so_far, stage)
        if n_drop <= 0:
            return None
        return drop_lowest(inp, self._scores(inp), n_drop)  # scores: (B, n) float32

    def _scores(self, inp: StageInput) -> torch.Tensor:
        """``(B, n)`` float32 head-mean attention of the last token to each vision token, at layer ``l_s``."""
        B = inp.hidden.shape[0]
        n = inp.vision.count
        if self._fixed_scores is not None:
            fixed = self._fixed_scores.get(inp.layer)
            if fixed is None or tuple(fixed.shape) != (B, n):
                shape = None if fixed is None else tuple(fixed.shape)
                raise ValueError(f"fixed scores of layer {inp.layer} have shape {shape}, expected {(B, n)}")
            return fixed.to(device=inp.hidden.device, dtype=torch.float32)
        q, k, scale = last_token_qk(self._adapter, inp.layer + 1, inp.hidden, inp.position_embeddings)
        k = expand_kv(k, q.shape[1])
        logits = torch.matmul(q, k.transpose(-1, -2)).squeeze(2) * scale  # (B, H, S)
        real = inp.attention_mask_2d.bool().to(logits.device)
        logits = logits.masked_fill(~real.unsqueeze(1), float("-inf"))
        probs = torch.softmax(logits, dim=-1).mean(dim=1)  # (B, S)
        return probs.gather(1, inp.vision.positions)


def last_token_qk(
    adapter: FamilyAdapter, layer: int, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Layer ``layer``'s post-RoPE float32 query of the last token and keys of every token, from its input.

    Args:
        adapter: the model's family adapter (layers, rotary function).
        layer: the decoder layer whose projections are used.
        hidden: ``(B, S, D)`` the layer's input hidden states.
        position_embeddings: ``(cos, sin)`` at the current positions (sequence on axis -2).

    Returns:
        ``(q, k, scale)``: ``(B, H, 1, d)``, ``(B, H_kv, S, d)`` and the layer's logit scale.
    """
    module = adapter.layers[layer]
    attn = module.self_attn
    d = attn.head_dim
    B, S, _ = hidden.shape
    x = module.input_layernorm(hidden)
    q = attn.q_proj(x[:, -1:]).view(B, 1, -1, d)
    k = attn.k_proj(x).view(B, S, -1, d)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    cos, sin = (t.float() for t in position_embeddings)
    rotary = adapter.rotary_function(layer)
    q = rotary(q, q, cos[..., -1:, :], sin[..., -1:, :])[0]
    k = rotary(k, k, cos, sin)[1]
    scale = float(getattr(attn, "scaling", d**-0.5))
    return q, k, scale
