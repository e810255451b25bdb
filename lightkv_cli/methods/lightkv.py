"""LightKV: prompt-guided merging of vision tokens inside the decoder during prefill.

Implements "Make Your LVLM KV Cache More Lightweight" (Chen, Guo, Zimmermann, TMLR 2026,
arXiv 2605.00789) from its definition in ``shared/docs/METHODS.md`` §1, not from the released code
(whose LLaVA path replaces the guidance by random numbers, runs the first merge layer without a
causal mask, needs eager attention and supports batch size 1 only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightkv_cli.errors import UserError
from lightkv_cli.measure.timing import profile_range
from lightkv_cli.methods import schedule
from lightkv_cli.methods.attention import post_rope_qk
from lightkv_cli.methods.base import POSITION_MODES, SequencePress, StageInput, StageOutput
from lightkv_cli.methods.guidance import GUIDANCE_MODES, cross_guidance_batched, prompt_guidance_batched
from lightkv_cli.methods.merging import batched_plan
from lightkv_cli.models.adapters import FamilyAdapter


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
        self.layers, self.windows, self.ratios = schedule.check_stages(self.layers, self.windows, self.ratios)
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
        return schedule.stage_layers(self.layers, self.ratios)

    def validate(self, adapter: FamilyAdapter) -> None:
        """Raise when the schedule does not fit the model (:func:`~lightkv_cli.methods.schedule.validate`).

        Raises:
            UserError: a stage after the last-but-one decoder layer.
            UnsupportedInputError: ``positions="renumber"`` for a family with multi-axis positions.
        """
        schedule.validate(adapter, self.layers, self.positions)

    def predict(self, model: nn.Module, grids: Sequence[tuple[int, int]] | None = None, special: int = 0) -> list[int]:
        """Predicted vision tokens cached by each decoder layer (length ``L``).

        Args:
            model: the model (depth; its representative image grids when ``grids`` is None).
            grids: the ``(rows, cols)`` grids of an actual input (e.g. ``press.last_prefill.grids``:
                LLaVA-NeXT base and high-resolution grids, Qwen2-VL images or video frames), each
                windowed on its own; default: one representative image of the family.
            special: never-merged vision tokens besides the grids (newlines, CLS), with ``grids``.

        Also sets :attr:`expected_retention`.

        Raises:
            UserError, UnsupportedInputError: as :meth:`validate`.
        """
        return schedule.predict(self, model, grids, special)

    @classmethod
    def for_retention(
        cls, retention: float, model: nn.Module, guidance: str = "cross", positions: str = "keep"
    ) -> LightKV:
        """Build a schedule whose average vision retention is as close as possible to ``retention``.

        Rules (METHODS.md §1, :func:`~lightkv_cli.methods.schedule.for_retention`): stages at 3/8, 9/16
        and 3/4 of the decoder depth with 4, 2, 1 windows, and one common ratio solved for the target.
        When the target cannot be reached with ratio ≤ 0.5 at those depths, the stages move earlier
        (all depths scaled down together); if that is still not enough, a fourth stage (1 window, at
        7/8 of the depth) is added. The chosen schedule is described in :attr:`schedule_note`; the
        predicted retention is :attr:`expected_retention`.

        Args:
            retention: target average vision retention ``R`` in ``(0, 1]``.
            model: the model (its depth and vision grid decide the schedule).
            guidance, positions: as the class's fields.

        Raises:
            UserError: ``retention`` outside ``(0, 1]``, or below the lowest retention reachable.
            UnsupportedInputError: ``positions="renumber"`` for a family with M-RoPE positions.
        """
        return schedule.for_retention(cls, retention, model, guidance=guidance, positions=positions)

    def with_fixed_guidance(self, guidance: list[torch.Tensor | None]) -> LightKV:
        """A copy that uses the given per-stage guidance weights instead of computing them.

        For verification and reproduction: replaying the weights recorded in
        ``press.last_prefill.stages[k].guidance`` (``(B, n_k)`` each) on a longer input (the prompt
        followed by generated tokens) reproduces the same merges, which is how an uncached
        reference forward is compared with cached decoding.

        Args:
            guidance: one ``(B, n_k)`` float tensor per entry of :attr:`layers` (None for a stage that
                merged nothing, whose weights are then never read).
        """
        new = dataclasses.replace(self)
        new._fixed_guidance = [None if g is None else g.clone() for g in guidance]
        return new

    def replay(self) -> LightKV:
        """A copy that makes the last prefill's merges again: its recorded guidance, stage by stage.

        See :meth:`SequencePress.replay`; the guidance an uncached forward over the prompt and the
        generated tokens would compute differs (the text after the image changes), so it is replayed.

        Raises:
            RuntimeError: no prefill ran under this press yet.
        """
        rec = self.last_prefill
        if rec is None:
            raise RuntimeError("replay() needs a prefill under this press first")
        by_layer = {s.layer: s.guidance for s in rec.stages}
        return self.with_fixed_guidance([by_layer.get(lay) for lay in self.layers])

    # --- one stage -----------------------------------------------------------------------------
    def reduce(self, inp: StageInput) -> StageOutput | None:
        """One stage for the whole batch: windows, bipartite matching, guidance, weighted merge.

        Rows must keep the same number of tokens; windows that do not nest across stages can give
        rows different candidate counts, so every row merges its ``m`` most similar pairs, ``m`` the
        smallest row's count. Reading ``m`` is the stage's one host synchronisation. Returns None
        when no window can merge anything (the sequence is left untouched). Hidden states are merged
        in float32 and cast back to the model dtype; unmerged tokens are copied bit for bit.
        """
        k = self.layers.index(inp.layer)
        windows, ratio = self.windows[k], self.ratios[k]
        vis = inp.vision
        with profile_range("lightkv::match"):
            D = inp.hidden.shape[-1]
            feats = inp.hidden.gather(1, vis.positions.unsqueeze(-1).expand(-1, -1, D))  # (B, n, D)
            plan = batched_plan(
                feats, vis.window_ids(windows), vis.num_windows(windows), vis.max_window_size(windows), ratio
            )
            m = int(plan.counts().amin())  # the stage's host synchronisation: sizes the shorter sequence
        if m == 0:
            return None
        src, dst = plan.top(m)
        with profile_range("lightkv::guidance"):
            g_all = self._guidance_weights(inp)  # (B, n) float32 over each row's vision tokens
        with profile_range("lightkv::merge"):
            return self._merge(inp, feats, src, dst, g_all)

    def _merge(
        self, inp: StageInput, x_in: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, g: torch.Tensor
    ) -> StageOutput:
        """Guidance-weighted mean of each merged A token into its B token (float32); survivors mask.

        Only the B tokens that receive a merge are written; every other token keeps its hidden
        state bit for bit.

        Args:
            x_in: ``(B, n, D)`` the vision tokens' hidden states; ``src``, ``dst``: ``(B, m)`` merged
                tokens and the tokens they merge into; ``g``: ``(B, n)`` float32 guidance.
        """
        hidden = inp.hidden
        D = x_in.shape[-1]
        pos = inp.vision.positions
        num = x_in.float() * g.unsqueeze(-1)  # g·x of every token
        dst_e = dst.unsqueeze(-1).expand(-1, -1, D)
        num.scatter_add_(1, dst_e, num.gather(1, src.unsqueeze(-1).expand(-1, -1, D)))  # + Σ g_a·x_a
        den = g.scatter_add(1, dst, g.gather(1, src))  # g_b + Σ g_a
        merged = num / den.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        src_pos, dst_pos = pos.gather(1, src), pos.gather(1, dst)
        # several A tokens may share a B token: they write the same value
        out = hidden.scatter(1, dst_pos.unsqueeze(-1).expand(-1, -1, D), merged.gather(1, dst_e).to(hidden.dtype))
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device).scatter_(1, src_pos, False)
        return StageOutput(
            keep=keep, removed=src.shape[1], hidden=out, guidance=g, pairs=torch.stack([src_pos, dst_pos], dim=-1)
        )

    def _guidance_weights(self, inp: StageInput) -> torch.Tensor:
        """``(B, n)`` float32 guidance weights of each row's vision tokens (in order), on the device."""
        B = inp.hidden.shape[0]
        vis = inp.vision
        n = vis.count
        device = inp.hidden.device
        k = self.layers.index(inp.layer)
        if self._fixed_guidance is not None:
            g = self._fixed_guidance[k]
            if g is None or tuple(g.shape) != (B, n):
                got = None if g is None else tuple(g.shape)
                raise ValueError(f"fixed guidance for stage {k} has shape {got}, expected {(B, n)}")
            return g.to(device=device, dtype=torch.float32)
        if self.guidance == "uniform":
            return torch.ones(B, n, dtype=torch.float32, device=device)
        q, kk = post_rope_qk(inp, self._adapter)
        attn = inp.module.self_attn
        scale = float(getattr(attn, "scaling", q.shape[-1] ** -0.5))
        real = inp.attention_mask_2d != 0
        if self.guidance == "cross":
            g = cross_guidance_batched(q, kk, vis.text_positions, real, scale)
        else:  # positions ascend: a row's last vision token is its last entry
            g = prompt_guidance_batched(q, kk, vis.positions[:, -1], real, vis.after_last, scale)
        return g.gather(1, vis.positions)
