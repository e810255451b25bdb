"""Batches of prepared inputs: which inputs may share a forward, how their tensors are left-padded into one,
and which inputs the timing pass measures.

A batch holds inputs with the same number of vision tokens and the same shape of every visual tensor
(``pixel_values`` of a fixed-resolution family; the patch count of a LLaVA-NeXT image), so that every
row's vision tokens are the same count and a method keeps the same number of them in every row; the
prompts may differ in length and are left-padded (what ``generate()`` and every serving engine do for
decoder-only models), so the last prompt token of every row sits at the same position.

Nothing here runs the model; no torch work beyond concatenation and padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_cli.engine.prepare import ProfileInput


@dataclass(frozen=True)
class Batch:
    """One left-padded batch of inputs.

    Attributes:
        indices: positions of the batch's inputs in the sweep's input list, in row order.
        tensors: the model's keyword arguments: every per-token tensor (``input_ids``, ``attention_mask``,
            Qwen's ``mm_token_type_ids``) ``(B, S)`` with ``S`` the longest prompt, left-padded (ids with
            the pad token, the mask and the others with 0); every other tensor concatenated along its first
            axis (``pixel_values`` ``(B, ...)``, or Qwen's flattened patches ``(Σ N_i, D)`` and
            ``image_grid_thw`` ``(Σ images, 3)``).
        pads: left pads of each row (``B`` ints; 0 for the longest prompt).
    """

    indices: tuple[int, ...]
    tensors: dict
    pads: tuple[int, ...]

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return len(self.indices)


def batch_key(inp: ProfileInput) -> tuple:
    """What inputs must share to be batched together: vision tokens, and the trailing shape and dtype of
    every tensor that is not per-token (per-token tensors, ``(1, S)``, are padded to the longest prompt)."""
    seq = inp.tensors["input_ids"].shape[-1]
    shapes = []
    for name, t in sorted(inp.tensors.items()):
        if _per_token(t, seq):
            continue
        shapes.append((name, tuple(t.shape[1:]), str(t.dtype)))
    return (inp.vision_tokens, tuple(shapes))


def group_inputs(inputs: Sequence[ProfileInput]) -> list[list[int]]:
    """Indices of ``inputs`` grouped by :func:`batch_key`, groups in order of their first input, inputs in
    sweep order within a group."""
    groups: dict[tuple, list[int]] = {}
    for i, inp in enumerate(inputs):
        groups.setdefault(batch_key(inp), []).append(i)
    return list(groups.values())


def plan_batches(inputs: Sequence[ProfileInput], batch_size: int) -> list[list[int]]:
    """Batches of at most ``batch_size`` inputs that share a :func:`batch_key`, in group order.

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    out = []
    for group in group_inputs(inputs):
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return out


def collate(inputs: Sequence[ProfileInput], indices: Sequence[int], pad_token_id: int) -> Batch:
    """Left-pad and stack the tensors of ``inputs[i]`` for ``i`` in ``indices`` into one :class:`Batch`.

    Args:
        inputs: prepared inputs (batch size 1 each), on the model's device.
        indices: the rows of the batch; their inputs must share a :func:`batch_key`.
        pad_token_id: the id written into ``input_ids`` at padded positions (masked out; never a vision
            token id).

    Raises:
        ValueError: ``indices`` is empty or names inputs with different :func:`batch_key`.
    """
    if not indices:
        raise ValueError("a batch needs at least one input")
    rows = [inputs[i] for i in indices]
    if len({batch_key(r) for r in rows}) != 1:
        raise ValueError("inputs of one batch must share their vision-token count and visual tensor shapes")
    if len(rows) == 1:
        return Batch(tuple(indices), dict(rows[0].tensors), (0,))
    lens = [r.tensors["input_ids"].shape[-1] for r in rows]
    S = max(lens)
    pads = tuple(S - n for n in lens)
    out = {}
    for name in rows[0].tensors:
        parts = [r.tensors[name] for r in rows]
        if _per_token(parts[0], lens[0]):
            fill = pad_token_id if name == "input_ids" else 0
            parts = [_left_pad(t, p, fill) for t, p in zip(parts, pads)]
        out[name] = torch.cat(parts, dim=0)
    return Batch(tuple(indices), out, pads)


def _per_token(t: object, seq: int) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape[0] == 1 and t.shape[1] == seq


def _left_pad(t: torch.Tensor, pad: int, fill: int) -> torch.Tensor:
    if pad == 0:
        return t
    return torch.cat([t.new_full((t.shape[0], pad), fill), t], dim=1)


def pad_token_id(tokenizer, vision_token_ids: Sequence[int]) -> int:
    """The id to pad ``input_ids`` with: the tokenizer's pad token, else its end-of-sequence token, else 0 —
    the first that is not a vision token (a pad that read as an image token would be counted as one)."""
    vision = set(vision_token_ids)
    for cand in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(cand, int) and cand >= 0 and cand not in vision:
            return cand
    return next(i for i in range(len(vision) + 1) if i not in vision)


def timing_sample(inputs: Sequence[ProfileInput], count: int | None) -> list[int]:
    """The inputs the timing pass measures: ``count`` of them (None: all), chosen deterministically and
    spread over the :func:`group_inputs` groups (vision-token counts) — round-robin over the groups, each
    group's picks evenly spaced through it — returned in sweep order.

    Raises:
        ValueError: ``count`` < 1.
    """
    n = len(inputs)
    if count is None or count >= n:
        return list(range(n))
    if count < 1:
        raise ValueError(f"timing inputs must be ≥ 1, got {count}")
    groups = group_inputs(inputs)
    share = [0] * len(groups)
    left = count
    while left:  # round-robin: one more pick for each group that has inputs left
        for g, members in enumerate(groups):
            if left and share[g] < len(members):
                share[g] += 1
                left -= 1
    picked = []
    for members, k in zip(groups, share):
        step = len(members) / k if k else 0
        picked += [members[int(j * step)] for j in range(k)]
    return sorted(picked)


def timing_units(inputs: Sequence[ProfileInput], sample: Sequence[int], batch_size: int) -> list[list[int]]:
    """The batches one timing round measures for a timing batch size: the sampled inputs grouped by
    :func:`batch_key`, each group cut into batches of ``batch_size``; a group with fewer inputs than a
    batch (or a last, short batch) is filled by repeating its inputs in order, so every measured batch has
    exactly ``batch_size`` rows — what a server batching that many requests of one shape pays.

    Raises:
        ValueError: ``batch_size`` < 1 or ``sample`` empty.
    """
    if batch_size < 1:
        raise ValueError(f"timing batch size must be ≥ 1, got {batch_size}")
    if not sample:
        raise ValueError("the timing pass needs at least one input")
    chosen = [inputs[i] for i in sample]
    units = []
    for group in group_inputs(chosen):
        members = [sample[j] for j in group]
        for start in range(0, len(members), batch_size):
            unit = members[start : start + batch_size]
            k = 0
            while len(unit) < batch_size:
                unit.append(members[k % len(members)])
                k += 1
            units.append(unit)
    return units
