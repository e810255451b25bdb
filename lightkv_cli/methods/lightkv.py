"""LightKV: prompt-guided merging of vision tokens inside the decoder during prefill.

Implements "Make Your LVLM KV Cache More Lightweight" (Chen, Guo, Zimmermann, TMLR 2026,
arXiv 2605.00789) from its definition in ``shared/docs/METHODS.md`` §1, not from the released code
(whose LLaVA path replaces the guidance by random numbers, runs the first merge layer without a
causal mask, needs eager attention and supports batch size 1 only).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightkv_cli.errors import UnsupportedInputError, UserError
from lightkv_cli.methods.base import POSITION_MODES, SequencePress, StageInput, StageOutput
from lightkv_cli.methods.guidance import GUIDANCE_MODES, cross_guidance, prompt_guidance
from lightkv_cli.methods.merging import MergePlan, bipartite_plan, simulate_counts, window_ids
from lightkv_cli.models.adapters import FamilyAdapter, adapter_for

#: Default stage depths as fractions of the decoder depth (12, 18, 24 of 32 for LLaVA-1.5-7B).
DEFAULT_FRACTIONS = (3 / 8, 9 / 16, 3 / 4)
DEFAULT_WINDOWS = (4, 2, 1)
#: A fourth stage, used only when a target cannot be reached with three.
EXTRA_FRACTION, EXTRA_WINDOWS = 7 / 8, 1


@dataclass
class LightKV(SequencePress):
    """LightKV (TMLR 2026): merge redundant vision tokens after chosen decoder layers during prefill.

    After decoder layer ``layers[k]`` has run, the vision tokens of every image are split into
    ``windows[k] × windows[k]`` windows on the image's true token grid. In each window, tokens
    alternate between sets A and B; every A token finds its most cosine-similar B token and the
    ``r_w = min(floor(ratios[k]·n_w), floor(n_w/2))`` most similar A tokens merge into their B token
    as a guidance-weighted mean. Later layers process, and cache, the shorter sequence; the layer
    itself and every earlier layer keep the full sequence; decoding is never compressed further.

    Args:
        layers: decoder layers after which a stage runs, strictly increasing, each in ``[0, L-2]``.
        windows: windows per grid axis at each stage (``W ≥ 1``).
        ratios: fraction of each window's tokens removed at each stage, in ``[0, 1]``; the removal
            is capped at half a window, so ratios above 0.5 act as 0.5.
        guidance: weights of the merge. ``"cross"`` (default, the published definition): attention
            logits between every prompt query and every text key, softmax over the query axis,
            summed over heads and text keys. ``"prompt"``: causal attention paid by the text after
            the last image to each token, averaged over heads and queries. ``"uniform"``: equal
            weights (the paper's "without prompt guidance" ablation).
        positions: ``"keep"`` (default): survivors keep their position ids (a merged token its B
            token's), consistent with ``generate()``. ``"renumber"``: 1-D RoPE families only,
            positions ``0..S'-1`` in compressed layers, decode positions shifted to continue from ``S'``.

    Attributes:
        expected_retention: the average vision retention the schedule is predicted to reach (set by
            :meth:`for_retention` and :meth:`predict`); the measured value is
            ``press.last_prefill.vision_retention``.
        schedule_note: how :meth:`for_retention` chose the schedule.

    Raises:
        UserError: inconsistent or out-of-range schedule, unknown guidance or positions mode.

    Example::

        press = LightKV(layers=[12, 18, 24], windows=[4, 2, 1], ratios=[0.5, 0.5, 0.5])
        with press(model):
            out = model.generate(**inputs, max_new_tokens=32)
        press.last_prefill.layer_vision_tokens  # vision tokens cached per layer
    """

    layers: Sequence[int]
    windows: Sequence[int]
    ratios: Sequence[float]
    guidance: str = "cross"
    positions: str = "keep"
    expected_retention: float | None = field(default=None, compare=False)
    schedule_note: str = field(default="", compare=False)
    _fixed_guidance: list | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        self.windows = [int(x) for x in self.windows]
        self.ratios = [float(x) for x in self.ratios]
        if not (len(self.layers) == len(self.windows) == len(self.ratios)):
            raise UserError(
                f"layers, windows and ratios must have the same length (got {len(self.layers)}, "
                f"{len(self.windows)}, {len(self.ratios)}); give one window count and one ratio per stage"
            )
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])) or any(x < 0 for x in self.layers):
            raise UserError(f"layers must be non-negative and strictly increasing, got {self.layers}")
        if any(w < 1 for w in self.windows):
            raise UserError(f"windows must be ≥ 1, got {self.windows}")
        if any(not (0.0 <= r <= 1.0) or math.isnan(r) for r in self.ratios):
            raise UserError(f"ratios must be in [0, 1], got {self.ratios}")
        if self.guidance not in GUIDANCE_MODES:
            raise UserError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {self.guidance!r}")
        if self.positions not in POSITION_MODES:
            raise UserError(f"positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")

    # --- schedule ----------------------------------------------------------------------------
    @property
    def needs_qk(self) -> bool:  # type: ignore[override]
        """Whether the stage layers' query/key projections must be captured (attention guidance)."""
        return self.guidance != "uniform" and self._fixed_guidance is None

    def describe(self) -> dict:
        """Parameters for results files: schedule, guidance, positions and how the schedule was chosen."""
        return {
            "layers": list(self.layers),
            "windows": list(self.windows),
            "ratios": [round(r, 6) for r in self.ratios],
            "guidance": self.guidance,
            "positions": self.positions,
            "schedule_note": self.schedule_note,
        }

    def stage_layers(self, num_layers: int) -> list[int]:
        """The schedule's layers whose ratio is non-zero (a zero-ratio stage changes nothing)."""
        return [lay for lay, r in zip(self.layers, self.ratios) if r > 0]

    def validate(self, adapter: FamilyAdapter) -> None:
        """Raise ``UserError`` when a stage layer leaves no later decoder layer to compress.

        Raises:
            UserError: a stage after the last-but-one decoder layer.
            UnsupportedInputError: ``positions="renumber"`` for a family with multi-axis positions.
        """
        if self.positions == "renumber" and not adapter.supports_renumber:
            raise UnsupportedInputError(
                f"positions='renumber' needs 1-D RoPE; the {adapter.family} family uses M-RoPE (t, h, w) positions, "
                "for which renumbering is not defined: use positions='keep'"
            )
        L = adapter.num_layers
        bad = [lay for lay in self.layers if lay > L - 2]
        if bad:
            raise UserError(
                f"stage layers {bad} leave no later layer to compress: this model has {L} decoder layers, "
                f"so stages must be after layers 0..{L - 2}"
            )

    def predict(self, model: nn.Module, grids: Sequence[tuple[int, int]] | None = None, special: int = 0) -> list[int]:
        """Predicted vision tokens cached by each decoder layer (length ``L``).

        Args:
            model: the model (depth; its representative image grids when ``grids`` is None).
            grids: the ``(rows, cols)`` grids of an actual input (e.g. ``press.last_prefill.grids``:
                LLaVA-NeXT base and high-resolution grids, Qwen2-VL images or video frames), each
                windowed on its own; default: one representative image of the family.
            special: never-merged vision tokens besides the grids (newlines, CLS), with ``grids``.

        Also sets :attr:`expected_retention`.
        """
        adapter = adapter_for(model)
        self.validate(adapter)
        counts = _predict_layer_counts(adapter, self.layers, self.windows, self.ratios, grids, special)
        self.expected_retention = sum(counts) / (len(counts) * counts[0])
        return counts

    @classmethod
    def for_retention(
        cls, retention: float, model: nn.Module, guidance: str = "cross", positions: str = "keep"
    ) -> LightKV:
        """Build a schedule whose average vision retention is as close as possible to ``retention``.

        Rules (METHODS.md §1): stages at 3/8, 9/16 and 3/4 of the decoder depth with 4, 2, 1
        windows, and one common ratio solved for the target. When the target cannot be reached with
        ratio ≤ 0.5 at those depths, the stages move earlier (all depths scaled down together); if
        that is still not enough, a fourth stage (1 window, at 7/8 of the depth) is added. The
        chosen schedule is described in :attr:`schedule_note`; the predicted retention is
        :attr:`expected_retention`.

        Args:
            retention: target average vision retention ``R`` in ``(0, 1]``.
            model: the model (its depth and vision grid decide the schedule).

        Raises:
            UserError: ``retention`` outside ``(0, 1]``, or below the lowest retention reachable.
        """
        if not (0.0 < retention <= 1.0) or math.isnan(retention):
            raise UserError(f"retention must be in (0, 1], got {retention}")
        adapter = adapter_for(model)
        L = adapter.num_layers
        if L < 5:
            raise UserError(f"LightKV.for_retention needs at least 5 decoder layers; this model has {L}")

        def build(layers, windows, ratio, note):
            press = cls(layers, windows, [ratio] * len(layers), guidance=guidance, positions=positions)
            press.validate(adapter)
            counts = _predict_layer_counts(adapter, press.layers, press.windows, press.ratios)
            press.expected_retention = sum(counts) / (len(counts) * counts[0])
            press.schedule_note = note
            return press

        def retention_of(layers, windows, ratio):
            counts = _predict_layer_counts(adapter, layers, windows, [ratio] * len(layers))
            return sum(counts) / (len(counts) * counts[0])

        default_layers = _layers_at(DEFAULT_FRACTIONS, L, 1.0) or _layers_at(DEFAULT_FRACTIONS, L, 0.05)
        if retention >= 1.0:
            return build(default_layers, list(DEFAULT_WINDOWS), 0.0, "target 1.0: ratio 0, nothing is merged")
        for fractions, windows in (
            (DEFAULT_FRACTIONS, DEFAULT_WINDOWS),
            (DEFAULT_FRACTIONS + (EXTRA_FRACTION,), DEFAULT_WINDOWS + (EXTRA_WINDOWS,)),
        ):
            for step in range(20):
                scale = 1.0 - step * 0.05
                layers = _layers_at(fractions, L, scale)
                if layers is None:
                    continue
                if retention_of(layers, windows, 0.5) > retention + 1e-9:
                    continue
                ratio = _solve_ratio(lambda r, ls=layers, ws=windows: retention_of(ls, ws, r), retention)
                where = "default depths" if step == 0 else f"depths scaled by {scale:.2f} (moved earlier)"
                extra = "" if len(fractions) == 3 else ", with a fourth stage"
                note = (
                    f"layers {layers} of {L} ({where}{extra}), windows {list(windows)}, "
                    f"common ratio {ratio:.4f} solved for target {retention:g}"
                )
                return build(layers, list(windows), ratio, note)
        floor_fractions, floor_windows = DEFAULT_FRACTIONS + (EXTRA_FRACTION,), DEFAULT_WINDOWS + (EXTRA_WINDOWS,)
        floor_layers = _layers_at(floor_fractions, L, 0.05)
        if floor_layers is None:  # too shallow for four stages
            floor_layers, floor_windows = _layers_at(DEFAULT_FRACTIONS, L, 0.05), DEFAULT_WINDOWS
        lowest = retention_of(floor_layers, floor_windows, 0.5)
        raise UserError(
            f"target retention {retention:g} is below the lowest this model reaches with LightKV "
            f"(about {lowest:.3f} with stages after layers {floor_layers}); choose a larger target"
        )

    def with_fixed_guidance(self, guidance: list[torch.Tensor]) -> LightKV:
        """A copy that uses the given per-stage guidance weights instead of computing them.

        For verification and reproduction: replaying the weights recorded in
        ``press.last_prefill.stages[k].guidance`` (``(B, n_k)`` each) on a longer input (the prompt
        followed by generated tokens) reproduces the same merges, which is how an uncached
        reference forward is compared with cached decoding.
        """
        new = dataclasses.replace(self)
        new._fixed_guidance = [g.clone() for g in guidance]
        return new

    # --- one stage -----------------------------------------------------------------------------
    def reduce(self, inp: StageInput) -> StageOutput | None:
        """One stage: plan merges per row (windows, bipartite matching), weight them by guidance, merge.

        Returns None when no window can merge anything (the sequence is left untouched). Hidden
        states are merged in float32 and cast back to the model dtype; unmerged tokens are copied
        bit for bit.
        """
        k = self.layers.index(inp.layer)
        windows, ratio = self.windows[k], self.ratios[k]
        with torch.profiler.record_function("lightkv::match"):
            plans, mergeable_idx = self._plan(inp, windows, ratio)
        m = min(len(p) for p in plans)
        if m == 0:
            return None
        # Rows must keep the same number of tokens; windows that do not nest across stages can give
        # rows different counts, so rows with more candidate merges keep their m most similar.
        plans = [p.top(m) for p in plans]
        with torch.profiler.record_function("lightkv::guidance"):
            g_all = self._guidance_weights(inp)  # (B, n) float32 over each row's vision tokens
        with torch.profiler.record_function("lightkv::merge"):
            return self._merge(inp, plans, mergeable_idx, g_all)

    def _plan(self, inp: StageInput, windows: int, ratio: float) -> tuple[list[MergePlan], list[torch.Tensor]]:
        """Per row: the bipartite merge plan of its mergeable vision tokens, and their layout indices."""
        hidden = inp.hidden
        plans: list[MergePlan] = []
        mergeable_idx = []
        for b, lay in enumerate(inp.layouts):
            idx = torch.nonzero(lay.mergeable).flatten()
            mergeable_idx.append(idx)
            if idx.numel() == 0:
                plans.append(bipartite_plan(hidden.new_zeros(0, 1), idx, 1, ratio))
                continue
            wid = window_ids(lay.coords[idx], lay.image[idx], lay.grids, windows)
            num_windows = len(lay.grids) * windows * windows
            feats = hidden[b, lay.positions[idx].to(hidden.device)]
            plans.append(bipartite_plan(feats, wid.to(hidden.device), num_windows, ratio))
        return plans, mergeable_idx

    def _merge(
        self, inp: StageInput, plans: list[MergePlan], mergeable_idx: list[torch.Tensor], g_all: torch.Tensor
    ) -> StageOutput:
        """Guidance-weighted mean of each merged A token into its B token (float32); survivors mask."""
        hidden = inp.hidden
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        out = hidden.clone()
        pairs = []
        for b, lay in enumerate(inp.layouts):
            idx = mergeable_idx[b].to(hidden.device)
            pos = lay.positions.to(hidden.device)[idx]
            src, dst = plans[b].src, plans[b].dst
            g = g_all[b].to(hidden.device)[idx]
            x = hidden[b, pos].float()
            num = x * g.unsqueeze(1)
            den = g.clone()
            num.index_add_(0, dst, x[src] * g[src].unsqueeze(1))
            den.index_add_(0, dst, g[src])
            receivers = torch.unique(dst)
            merged = num[receivers] / den[receivers].clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
            out[b, pos[receivers]] = merged.to(hidden.dtype)
            keep[b, pos[src]] = False
            pairs.append(torch.stack([pos[src], pos[dst]], dim=1))
        return StageOutput(keep=keep, hidden=out, guidance=g_all, pairs=pairs)

    def _guidance_weights(self, inp: StageInput) -> torch.Tensor:
        """``(B, n)`` float32 guidance weights of each row's vision tokens (in layout order)."""
        B = inp.hidden.shape[0]
        n = inp.layouts[0].count
        k = self.layers.index(inp.layer)
        if self._fixed_guidance is not None:
            g = self._fixed_guidance[k]
            if tuple(g.shape) != (B, n):
                raise ValueError(f"fixed guidance for stage {k} has shape {tuple(g.shape)}, expected {(B, n)}")
            return g.float()
        if self.guidance == "uniform":
            return torch.ones(B, n, dtype=torch.float32)
        q, kk = post_rope_qk(inp, self._adapter)
        attn = inp.module.self_attn
        scale = float(getattr(attn, "scaling", q.shape[-1] ** -0.5))
        real = inp.attention_mask_2d.bool()
        rows = []
        for b, lay in enumerate(inp.layouts):
            vision = torch.zeros(inp.hidden.shape[1], dtype=torch.bool, device=q.device)
            vision[lay.positions.to(q.device)] = True
            if self.guidance == "cross":
                g = cross_guidance(q[b], kk[b], ~vision & real[b], real[b], scale)
            else:
                g = prompt_guidance(q[b], kk[b], vision, real[b], scale)
                if g is None:  # no text after the images: nothing to be guided by
                    g = torch.ones(inp.hidden.shape[1], dtype=torch.float32, device=q.device)
            rows.append(g[lay.positions.to(q.device)])
        return torch.stack(rows).cpu()


def post_rope_qk(inp: StageInput, adapter: FamilyAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE float32 queries ``(B, H, S, d)`` and keys ``(B, H_kv, S, d)`` of the stage layer."""
    if inp.queries is None or inp.keys is None:
        raise RuntimeError("internal error: q_proj/k_proj outputs were not captured for guidance")
    attn = inp.module.self_attn
    B, S, _ = inp.hidden.shape
    d = attn.head_dim
    q = inp.queries.view(B, S, -1, d)
    k = inp.keys.view(B, S, -1, d)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    q = q.transpose(1, 2).float()
    k = k.transpose(1, 2).float()
    cos, sin = inp.position_embeddings
    rotary = adapter.rotary_function(inp.layer)
    q, k = rotary(q, k, cos.float(), sin.float())
    return q, k


def _layers_at(fractions: Sequence[float], num_layers: int, scale: float) -> list[int] | None:
    """Stage layers at ``fraction · L · scale`` (rounded), strictly increasing, in ``[1, L-2]``."""
    layers = []
    for f in fractions:
        lay = max(1, int(math.floor(f * num_layers * scale + 0.5)))
        if layers and lay <= layers[-1]:
            lay = layers[-1] + 1
        layers.append(lay)
    if layers[-1] > num_layers - 2:
        return None
    return layers


def _solve_ratio(retention_of, target: float) -> float:
    """Common ratio in ``[0, 0.5]`` whose retention is closest to ``target`` (retention falls with ratio)."""
    lo, hi = 0.0, 0.5
    for _ in range(40):
        mid = (lo + hi) / 2
        if retention_of(mid) > target:
            lo = mid
        else:
            hi = mid
    # hi: smallest ratio reaching ≤ target; lo: just above target. Round outward to 4 decimals.
    r_hi = math.ceil(hi * 1e4) / 1e4
    r_lo = math.floor(lo * 1e4) / 1e4
    best = min((abs(retention_of(r) - target), r) for r in (r_hi, r_lo))
    return min(best[1], 0.5)


def _predict_layer_counts(adapter: FamilyAdapter, layers, windows, ratios, grids=None, special: int = 0) -> list[int]:
    """Vision tokens cached by each decoder layer under a schedule (length ``L``), for the given grids
    (each windowed on its own) plus ``special`` never-merged tokens, or one representative image."""
    L = adapter.num_layers
    if grids is None:
        grids, special = adapter.prediction_grids()
    per_image = sum(r * c for r, c in grids) + special
    stages = [(w, r) for w, r in zip(windows, ratios)]
    after = [special] * len(stages)
    for grid in grids:
        for k, c in enumerate(simulate_counts(tuple(grid), stages)):
            after[k] += c
    counts = [per_image] * L
    for lay, c in zip(layers, after):
        for j in range(lay + 1, L):
            counts[j] = c
    return counts
