"""Token maps: where the vision tokens of one image went under a compression method, compactly.

A press publishes what it did to the last prefill as ``press.last_prefill`` (see
:mod:`lightkv_cli.methods.records`). This module reads it through the record protocol only — stages with
kept indices and merge pairs, or per-layer eviction kept indices — never by asking which method ran, and
reduces it to one small JSON map per input over the cells of the first image's grid (row 0 of the batch):

- :func:`prompt_fates` (right after the measured generation, on the host): what happened to every prompt
  position — the stage that removed it and the token it finally merged into, or the share of layers × KV
  heads that kept it;
- :func:`first_grid`: the prompt positions of the first image's grid cells, from the family adapter (the
  same :meth:`~lightkv_cli.models.adapters.FamilyAdapter.vision_layouts` the presses use);
- :func:`token_map`: the two combined into the ``per_input[].token_map`` of the results file
  (``docs/results-schema.md``).

Nothing here is timed, nothing prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lightkv_cli.errors import UnsupportedInputError
from lightkv_cli.models.adapters import FamilyAdapter, VisionLayout

#: inputs of a run that get a map: the first image inputs of the sweep (the same for every run) …
FIRST_INPUTS = 4
#: … plus this many image inputs whose answer changed against the uncompressed run.
CHANGED_INPUTS = 4
#: decimals of ``kept_share``
SHARE_DECIMALS = 3


@dataclass
class PromptFates:
    """What a press did to every prompt position of row 0 (host tensors over the ``S`` prompt positions).

    Attributes:
        kind: ``"merge"`` (at least one stage merged), ``"drop"`` (stages removed tokens without merging)
            or ``"evict"`` (post-prefill eviction, per layer and KV head).
        stages: number of stages (0 for ``"evict"``).
        stage: ``(S,)`` int32, 0 = kept to the end, ``s`` = removed at stage ``s`` (1-based); None for evict.
        dest: ``(S,)`` long, the prompt position a token finally merged into (itself when not merged);
            None unless ``kind == "merge"``.
        kept_share: ``(S,)`` float32, fraction of layers × KV heads keeping the position; evict only.
    """

    kind: str
    stages: int = 0
    stage: torch.Tensor | None = None
    dest: torch.Tensor | None = None
    kept_share: torch.Tensor | None = None


@dataclass
class GridCells:
    """The cells of one image grid and where they sit in the prompt.

    Attributes:
        rows, cols: the grid shape.
        positions: ``(rows·cols,)`` long prompt index of each cell, row-major.
    """

    rows: int
    cols: int
    positions: torch.Tensor


def prompt_fates(record, row: int = 0, pad: int = 0) -> PromptFates | None:
    """Reduce a ``press.last_prefill`` record to :class:`PromptFates` of one batch row, or None.

    ``row`` is the row of the batch and ``pad`` its left pads: the fates are over the row's own prompt
    positions (``S − pad`` of them, the positions it has alone at batch 1); padding and the filler slots of
    an eviction of a padded batch (kept indices below ``pad``) are left out.

    Read through the record protocol: a record with ``stages`` (each possibly with ``merge_pairs``, original
    prompt indices ``(merged, into)`` per row) and one ``kept_index`` ``(B, S_k)`` per stage is an in-prefill
    reduction; a record without stages whose ``kept_index`` holds ``(B, H_kv, k_l)`` per layer is an eviction.
    Anything else (no record, missing or inconsistent fields) gives None, never an error.
    """
    if record is None:
        return None
    try:
        S = int(record.seq_len)
        kept = list(getattr(record, "kept_index", None) or [])
        stages = getattr(record, "stages", None)
        if stages is not None:
            return _sequence_fates(S, list(stages), kept, row, pad)
        return _eviction_fates(record, S, kept, row, pad)
    except (AttributeError, TypeError, ValueError, IndexError, RuntimeError):
        return None


def _sequence_fates(S: int, stages: list, kept: list[torch.Tensor], row: int, pad: int) -> PromptFates | None:
    if len(kept) != len(stages):
        return None
    S -= pad
    stage = torch.zeros(S, dtype=torch.int32)
    dest = torch.arange(S)
    alive = torch.ones(S, dtype=torch.bool)
    merged = False
    for s, (st, idx) in enumerate(zip(stages, kept), start=1):
        ids = torch.as_tensor(idx)[row].long().cpu() - pad
        survive = torch.zeros(S, dtype=torch.bool)
        survive[ids[ids >= 0]] = True
        stage[alive & ~survive] = s
        alive &= survive
        pairs = getattr(st, "merge_pairs", None)
        if pairs is not None:
            merged = True
            p = torch.as_tensor(pairs[row]).long().cpu().reshape(-1, 2) - pad
            dest[p[:, 0]] = p[:, 1]
    # follow merge chains (a → b at one stage, b → c at a later one) to their end
    for _ in range(max(1, len(stages)).bit_length() + 1):
        dest = dest[dest]
    return PromptFates(
        kind="merge" if merged else "drop", stages=len(stages), stage=stage, dest=dest if merged else None
    )


def _eviction_fates(record, S: int, kept: list[torch.Tensor], row: int, pad: int) -> PromptFates | None:
    S -= pad
    if not kept:
        # nothing evicted (e.g. a prompt without vision tokens): every layer kept the whole prompt
        if all(int(n) == S + pad for n in record.layer_seq_lens):
            return PromptFates(kind="evict", kept_share=torch.ones(S))
        return None
    share = torch.zeros(S, dtype=torch.float64)
    for idx in kept:
        idx = torch.as_tensor(idx).cpu()
        if idx.ndim != 3:
            return None
        heads = idx.shape[1]
        ids = idx[row].reshape(-1).long() - pad
        share += torch.bincount(ids[ids >= 0], minlength=S)[:S].double() / heads
    return PromptFates(kind="evict", kept_share=(share / len(kept)).float())


def first_grid(adapter: FamilyAdapter, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> GridCells | None:
    """The first grid of row 0's first visual input: its shape and the prompt positions of its cells.

    For LLaVA-NeXT the first grid is the image's *base* grid (the whole image at the vision tower's
    resolution, ``side × side``), not the high-resolution one; for LLaVA-1.5 and Qwen2-VL an image has one
    grid. The layout comes from :meth:`FamilyAdapter.vision_layouts` given the ids and the prefill position
    ids; a family that needs the decoder's input embeddings (LLaVA-NeXT's newlines) gets them from one
    forward that stops at the language model (vision tower and embedding only, no decoder layer runs).

    Returns:
        None when the prompt has no vision tokens or the grid is incomplete (e.g. a cut image).
    """
    layout = _row0_layout(adapter, model, inputs)
    if layout is None or layout.count == 0 or not layout.grids:
        return None
    if layout.owners and layout.owners[0] != 0:
        return None
    rows, cols = (int(x) for x in layout.grids[0])
    sel = (layout.image.cpu() == 0) & (layout.coords[:, 0].cpu() >= 0)
    coords = layout.coords.cpu()[sel]
    pos = layout.positions.cpu()[sel].long()
    if pos.numel() != rows * cols:
        return None
    cell = coords[:, 0] * cols + coords[:, 1]
    out = torch.full((rows * cols,), -1, dtype=torch.long)
    out[cell] = pos
    if bool((out < 0).any()):
        return None
    return GridCells(rows=rows, cols=cols, positions=out)


class _Stop(Exception):
    """Raised in the language model's pre-hook once the layout is read (the decoder need not run)."""


def _row0_layout(adapter: FamilyAdapter, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> VisionLayout | None:
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    position_ids = adapter.prefill_position_ids(inputs, mask)
    try:
        layouts = adapter.vision_layouts(input_ids, position_ids=position_ids)
    except UnsupportedInputError:
        layouts = layout_by_forward(adapter, model, inputs, mask, position_ids)
    return layouts[0] if layouts else None


def layout_by_forward(
    adapter: FamilyAdapter,
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> list[VisionLayout]:
    """The vision layouts of a prompt as the presses see them: read in the language model's pre-hook of one
    forward that is stopped there (the vision tower runs, no decoder layer does).

    Raises:
        UnsupportedInputError: the adapter cannot place the vision tokens on a grid.
    """
    found: list[VisionLayout] = []

    def hook(module, args, kwargs):
        found.extend(
            adapter.vision_layouts(
                inputs["input_ids"], inputs_embeds=kwargs.get("inputs_embeds"), position_ids=kwargs.get("position_ids")
            )
        )
        raise _Stop

    handle = adapter.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**{**inputs, "attention_mask": mask}, position_ids=position_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return found


def token_map(fates: PromptFates, grid: GridCells) -> dict | None:
    """The ``per_input[].token_map`` of one input (see ``docs/results-schema.md``), or None.

    Returns:
        ``{"grid": [rows, cols], "kind", "stages", "stage": [...], "group": [...]}`` for merge (``group``:
        index of the cell a cell finally merged into, -1 when not merged into another cell), the same
        without ``group`` for drop, ``{"grid", "kind": "evict", "kept_share": [...]}`` for evict; lists
        are per grid cell, row-major.
    """
    pos = grid.positions
    S = fates.stage.numel() if fates.stage is not None else fates.kept_share.numel()
    if pos.numel() == 0 or int(pos.max()) >= S:
        return None
    out: dict = {"grid": [grid.rows, grid.cols], "kind": fates.kind}
    if fates.kind == "evict":
        out["kept_share"] = [round(float(x), SHARE_DECIMALS) for x in fates.kept_share[pos].tolist()]
        return out
    out["stages"] = fates.stages
    out["stage"] = [int(x) for x in fates.stage[pos].tolist()]
    if fates.kind == "merge":
        cell_of = torch.full((S,), -1, dtype=torch.long)
        cell_of[pos] = torch.arange(pos.numel())
        final = fates.dest[pos]
        group = torch.where(final != pos, cell_of[final], torch.full_like(final, -1))
        out["group"] = [int(x) for x in group.tolist()]
    return out


def map_inputs(kinds: list[str], exact_matches: list[float | None]) -> list[int]:
    """Indices of the inputs (sweep order) that get a token map: the first :data:`FIRST_INPUTS` image inputs,
    then up to :data:`CHANGED_INPUTS` other image inputs whose answer changed (``exact_match == 0``)."""
    images = [i for i, k in enumerate(kinds) if k == "image"]
    first = images[:FIRST_INPUTS]
    changed = [i for i in images[FIRST_INPUTS:] if exact_matches[i] is not None and exact_matches[i] == 0][
        :CHANGED_INPUTS
    ]
    return first + changed
