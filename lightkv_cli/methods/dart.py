"""DART: keep the vision tokens least duplicated by a few pivot tokens, once, early in the decoder.

Implements "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., arXiv 2502.11494) from its definition in ``shared/docs/METHODS.md`` §5.2 (not from the
authors' code, whose limits — batch 1, one image at a hard-coded offset, a patched modeling file — are
not reproduced).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightkv_cli.errors import UnsupportedInputError, UserError
from lightkv_cli.methods.base import POSITION_MODES, SequencePress, StageInput, StageOutput
from lightkv_cli.models.adapters import FamilyAdapter, adapter_for

#: Pivots of each kind (image and text), as in the paper.
PIVOTS = 4
_FLOOR_EPS = 1e-9


@dataclass
class DART(SequencePress):
    """DART (arXiv 2502.11494): after layer ``K − 1``, keep 4 image pivots and, for each of 8 pivots,
    the ``topk`` vision tokens least similar to it; drop the rest.

    At the output of layer ``K − 1`` (the input of layer ``K``), for every batch row at once:

    1. ``ν_i = ‖k_i‖₁``, the ℓ1 norm of token ``i``'s post-RoPE key of layer ``K − 1`` over its
       ``H_kv·d`` entries (read from the cache, ``(B, H_kv, S, d)``; recomputed from ``k_proj`` when the
       forward runs without one).
    2. Pivots: the 4 vision tokens with the largest ``ν`` (image pivots, kept) and the 4 tokens after the
       row's last vision token with the largest ``ν`` (text pivots: question, template; not vision).
    3. ``ĥ = model.norm(h)`` (the final RMSNorm, γ included) of the ``(B, S, D)`` hidden states ``h``.
       For each pivot in turn (image pivots by decreasing ``ν``, then text pivots likewise), the ``topk``
       still-unselected, non-pivot vision tokens with the smallest cosine ``cos(ĥ_p, ĥ_i)`` are
       selected (ties: the earlier token).
    4. Kept: image pivots + selected, in sequence order; so ``k = 4 + 8·topk`` vision tokens (the
       published "128 tokens" keeps 132). Special tokens inside a vision run (LLaVA-NeXT newlines) are
       never dropped and come on top of ``k``; rows with ``≤ k`` droppable tokens are unchanged.

    Layers ``< K`` cache all ``n`` vision tokens, layers ``≥ K`` cache ``k``, so
    ``R = (K·n + (L − K)·k)/(L·n)``. The published LLaVA-1.5-7B setting (``K = 2``, ``topk = 16``, "128
    tokens") is ``R = 0.277``. Positions: the paper keeps the survivors' original positions (gaps
    included; decoding continues at ``S + t``), the default here.

    Args:
        layer: ``K ≥ 1`` (2 in the paper), at most ``L − 1``.
        topk: per-pivot quota ``TOPK ≥ 0`` (16 for the published LLaVA setting, whose scripts fix it);
            None keeps every vision token (no stage runs). Ignored when ``budget`` is set.
        budget: share of each input's vision tokens kept in layers ``≥ K``, in ``(0, 1]`` (the authors'
            Qwen code: ``1 − reduction_ratio``); each prefill then uses
            ``topk = max(0, ⌊(budget·n − special − 4)/8 + ½⌋)`` (the nearest count) for its own ``n``
            (dynamic-resolution inputs keep the same share whatever their size); 1 keeps everything. None:
            use ``topk``.
        positions: ``"keep"`` (default, as the paper) or ``"renumber"`` (1-D RoPE families only).

    Attributes:
        expected_retention: predicted average vision retention (:meth:`predict`, :meth:`for_retention`).
        schedule_note: how :meth:`for_retention` chose ``topk``.

    Raises:
        UserError: invalid parameters, or ``layer`` beyond the model's depth.
    """

    layer: int = 2
    topk: int | None = 16
    budget: float | None = None
    positions: str = "keep"
    expected_retention: float | None = field(default=None, compare=False)
    schedule_note: str = field(default="", compare=False)
    _fixed_keep: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    #: ``k_proj`` is captured for forwards without a cache (the keys are read from the cache otherwise)
    needs_qk = True

    def __post_init__(self) -> None:
        self.layer = int(self.layer)
        if self.layer < 1:
            raise UserError(f"DART layer K must be ≥ 1 (pivots come from layer K-1's keys), got {self.layer}")
        if self.topk is not None:
            if int(self.topk) != self.topk or self.topk < 0:
                raise UserError(f"DART topk must be a whole number ≥ 0 (or None: keep everything), got {self.topk}")
            self.topk = int(self.topk)
        if self.budget is not None:
            self.budget = float(self.budget)
            if math.isnan(self.budget) or not (0.0 < self.budget <= 1.0):
                raise UserError(f"DART budget must be in (0, 1], got {self.budget}")
        if self.positions not in POSITION_MODES:
            raise UserError(f"positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")

    def describe(self) -> dict:
        """Parameters for results files."""
        return {
            "layer": self.layer,
            "topk": self.topk,
            "budget": None if self.budget is None else round(self.budget, 6),
            "pivots": PIVOTS,
            "positions": self.positions,
            "schedule_note": self.schedule_note,
        }

    @property
    def keeps_everything(self) -> bool:
        """True when no vision token is ever dropped (``budget`` 1, or no budget and ``topk`` None)."""
        return (self.budget is None and self.topk is None) or (self.budget is not None and self.budget >= 1.0)

    def stage_layers(self, num_layers: int) -> list[int]:
        """The layer ``K − 1`` (none when :attr:`keeps_everything`)."""
        return [] if self.keeps_everything else [self.layer - 1]

    def validate(self, adapter: FamilyAdapter) -> None:
        """Raise ``UserError`` when ``K`` leaves no layer to compress."""
        L = adapter.num_layers
        if self.layer > L - 1:
            raise UserError(f"DART layer K={self.layer} leaves no layer to compress: this model has {L} decoder layers")

    def per_pivot(self, n: int, special: int = 0) -> int | None:
        """``TOPK`` for an input of ``n`` vision tokens, ``special`` of them never dropped (None: keep all)."""
        if self.keeps_everything:
            return None
        if self.budget is None:
            return self.topk
        return max(0, math.floor((self.budget * n - special - PIVOTS) / (2 * PIVOTS) + 0.5 + _FLOOR_EPS))

    def kept(self, n: int, special: int = 0) -> int:
        """Droppable vision tokens a row of ``n`` (``special`` never dropped) keeps: ``4 + 8·TOPK``, or all
        ``n − special`` when that is not fewer."""
        m = n - special
        topk = self.per_pivot(n, special)
        return m if topk is None else min(m, PIVOTS + 2 * PIVOTS * topk)

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
            grids, special = adapter.prediction_grids()
        n = sum(r * c for r, c in grids) + special
        after = special + self.kept(n, special)
        L = adapter.num_layers
        counts = [n if i < self.layer else after for i in range(L)]
        self.expected_retention = sum(counts) / (L * n)
        return counts

    @classmethod
    def for_retention(cls, retention: float, model: nn.Module, layer: int = 2, positions: str = "keep") -> DART:
        """DART at layer ``K`` keeping the share of vision tokens that gives average retention ``retention``.

        ``k = (R·L − K)·n/(L − K)`` vision tokens in layers ``≥ K``, i.e. ``budget = (R·L − K)/(L − K)``,
        applied to each input's ``n``: ``topk = ⌊(k − special − 4)/8 + ½⌋`` (``special``: never-dropped
        tokens, 0 for LLaVA-1.5), the nearest of DART's counts ``4 + 8·TOPK``, so the measured ``R`` is within
        ``4·(L − K)/(L·n)`` of the target (equal KV bytes with the other methods, as closely as DART allows).
        ``R = 1`` keeps everything.
        Example: ``R = 1/9`` on LLaVA-1.5-7B (``n = 576``) gives ``topk = 3``, ``k = 28``, actual ``R = 0.108``.

        Raises:
            UserError: ``retention`` outside ``(0, 1]``, at or below ``K / L``, or too small for the
                family's representative image to keep its 4 image pivots.
        """
        if math.isnan(retention) or not (0.0 < retention <= 1.0):
            raise UserError(f"retention must be in (0, 1], got {retention}")
        adapter = adapter_for(model)
        L = adapter.num_layers
        probe = cls(layer=layer, topk=None, positions=positions)
        probe.validate(adapter)
        if retention <= layer / L + 1e-9:
            raise UserError(
                f"target retention {retention:g} is at or below what DART reaches with K={layer} on this {L}-layer "
                f"model ({layer / L:.3f}: layers before K keep every vision token); choose a larger target"
            )
        budget = min(1.0, (retention * L - layer) / (L - layer))
        grids, special = adapter.prediction_grids()
        n = sum(r * c for r, c in grids) + special
        if budget < 1.0 and budget * n - special - PIVOTS < -1e-9:
            lowest = (layer * n + (L - layer) * (special + PIVOTS)) / (L * n)
            raise UserError(
                f"target retention {retention:g} is below the lowest DART reaches with K={layer} on this "
                f"{L}-layer model ({lowest:.3f}: it keeps at least its {PIVOTS} image pivots); "
                "choose a larger target"
            )
        press = cls(layer=layer, topk=None, budget=round(budget, 9), positions=positions)
        press.predict(model)
        topk = press.per_pivot(n, special)
        exact = press.budget * n - special
        kept = press.kept(n, special)
        press.schedule_note = (
            f"keep {press.budget:.4f} of the vision tokens (topk {topk} for {n}) after "
            f"layer {layer - 1} of {L}, solved for target {retention:g}"
            + (
                f"; DART keeps 4 + 8·TOPK tokens, so {kept} is the nearest to the {exact:.1f} the target asks"
                if budget < 1.0 and abs(kept - exact) >= 0.5
                else ""
            )
        )
        return press

    def with_fixed_keep(self, keep: torch.Tensor) -> DART:
        """A copy that keeps the given vision tokens instead of selecting them.

        Args:
            keep: ``(B, n)`` bool over the prompt's vision tokens (e.g. a record's guidance ``> 0``).
        """
        new = dataclasses.replace(self)
        new._fixed_keep = keep.bool().cpu().clone()
        return new

    def replay(self) -> DART:
        """A copy that keeps the last prefill's tokens again (its record's guidance: 1 for kept tokens).

        A longer input has more tokens after the image, so its text pivots, and the selection, could
        differ; the replay makes the same selection (see :meth:`SequencePress.replay`).

        Raises:
            RuntimeError: no prefill ran under this press yet.
        """
        rec = self.last_prefill
        if rec is None:
            raise RuntimeError("replay() needs a prefill under this press first")
        return self.with_fixed_keep(rec.stages[0].guidance > 0.5) if rec.stages else self

    def reduce(self, inp: StageInput) -> StageOutput | None:
        """Select every row's kept vision tokens at once (guidance: ``(B, n)`` 1.0 kept, 0.0 dropped).

        Host work is fixed: the counts are host ints, the greedy loop over the 8 pivots runs on the
        device without reading anything back.

        Raises:
            UnsupportedInputError: rows with different numbers of droppable vision tokens, or a row with
                fewer than 4 tokens after its last vision token (no text pivots).
        """
        vis = inp.vision
        B, S, _ = inp.hidden.shape
        device = inp.hidden.device
        if self._fixed_keep is not None:
            fixed = self._fixed_keep
            if tuple(fixed.shape) != (B, vis.count):
                raise ValueError(f"fixed selection has shape {tuple(fixed.shape)}, expected {(B, vis.count)}")
            kept_vis = fixed.to(device)
            removed = vis.count - int(fixed[0].sum())  # a host tensor: no device read
        else:
            counts = set(vis.mergeable_counts)
            if len(counts) > 1:
                raise UnsupportedInputError(
                    f"rows of the batch have different numbers of droppable vision tokens ({sorted(counts)}); "
                    "DART keeps the same number in every row: batch images of the same size, or run them one by one"
                )
            m = vis.mergeable_counts[0]
            removed = m - self.kept(vis.count, vis.count - m)
            if removed <= 0:
                return None
            kept_vis = self._select(inp)
        keep = torch.ones(B, S, dtype=torch.bool, device=device)
        keep.scatter_(1, vis.positions, kept_vis)
        return StageOutput(keep=keep, removed=removed, hidden=inp.hidden, guidance=kept_vis.float())

    def _key_norms(self, inp: StageInput) -> torch.Tensor:
        """``(B, S)`` float32 ℓ1 norms of layer ``K − 1``'s post-RoPE keys (``H_kv`` heads, not repeated)."""
        B, S, _ = inp.hidden.shape
        st = getattr(self, "_state", None)
        cache = None if st is None else st.cache
        keys = None
        if cache is not None and len(getattr(cache, "layers", ())) > inp.layer:
            keys = getattr(cache.layers[inp.layer], "keys", None)
            if keys is not None and (keys.shape[0] != B or keys.shape[2] != S):
                keys = None  # not this prefill's keys alone
        if keys is None:  # a forward without a cache: the same keys, from the captured k_proj output
            if inp.keys is None:
                raise RuntimeError("internal error: DART found neither cached nor captured keys")
            attn = inp.module.self_attn
            k = inp.keys.view(B, S, -1, attn.head_dim)
            norm = getattr(attn, "k_norm", None)
            if norm is not None:
                k = norm(k)
            k = k.transpose(1, 2).float()
            cos, sin = inp.position_embeddings
            keys = self._adapter.rotary_function(inp.layer)(k, k, cos.float(), sin.float())[1]
        return keys.float().abs().sum(dim=(1, 3))

    def _select(self, inp: StageInput) -> torch.Tensor:
        """``(B, n)`` bool: image pivots, the greedy selection and special tokens."""
        vis = inp.vision
        _, S, D = inp.hidden.shape
        device = inp.hidden.device
        # the layouts are host tensors: one host read for the batch, no device read
        last = max(torch.cat([lay.positions[-1:] for lay in vis.layouts]).tolist())
        if S - 1 - last < PIVOTS:
            raise UnsupportedInputError(
                f"DART needs at least {PIVOTS} text tokens after the last image (its text pivots); this prompt "
                f"has {S - 1 - last}: put the question after the image"
            )
        nu = self._key_norms(inp)  # (B, S)
        neg = float("-inf")
        nu_vis = nu.gather(1, vis.positions).masked_fill(~vis.mergeable, neg)  # (B, n)
        image_pivots = torch.sort(nu_vis, dim=1, descending=True, stable=True).indices[:, :PIVOTS]  # (B, 4)
        after = torch.arange(S, device=device).unsqueeze(0) > vis.positions[:, -1:]  # (B, S)
        text_pivots = torch.sort(nu.masked_fill(~after, neg), dim=1, descending=True, stable=True).indices[:, :PIVOTS]

        norm = self._adapter.language_model.norm
        feats = F.normalize(norm(inp.hidden.gather(1, vis.positions.unsqueeze(-1).expand(-1, -1, D))).float(), dim=-1)
        text = F.normalize(norm(inp.hidden.gather(1, text_pivots.unsqueeze(-1).expand(-1, -1, D))).float(), dim=-1)
        pivots = torch.cat([feats.gather(1, image_pivots.unsqueeze(-1).expand(-1, -1, D)), text], dim=1)  # (B, 8, D)
        cos = torch.matmul(pivots, feats.transpose(1, 2))  # (B, 8, n)

        kept = (~vis.mergeable).scatter(1, image_pivots, True)
        valid = vis.mergeable.scatter(1, image_pivots, False)
        topk = self.per_pivot(vis.count, vis.count - vis.mergeable_counts[0]) or 0
        if topk:
            for p in range(2 * PIVOTS):
                c = cos[:, p].masked_fill(~valid, float("inf"))
                chosen = torch.sort(c, dim=1, stable=True).indices[:, :topk]  # least similar; ties: earlier
                valid.scatter_(1, chosen, False)
                kept.scatter_(1, chosen, True)
        return kept
