"""Pre-LLM visual-token reduction: fewer vision tokens enter decoder layer 0 (DivPrune, and later VisionZip).

:class:`InputPress` is the base of methods that choose, per visual input (image or video), which of its
vision tokens the decoder sees at all. A subclass says how many of an input's ``m`` droppable tokens it
keeps (:meth:`InputPress.kept_count`) and which (:meth:`InputPress.select`, from the input's projector
outputs); the base does the rest, identically for every such method:

- **Prefill.** A pre-hook on the language model (the decoder stack) receives what the model built for
  the whole prompt: ``inputs_embeds`` with the projector outputs in place (the vision tower and
  projector ran once, as without a press), the 2-D ``attention_mask`` and the ``position_ids`` (Qwen's
  M-RoPE ``(3|4, B, S)`` ids included). It hands the decoder the shortened prompt instead: the kept
  tokens' embeddings, mask columns and position ids, in sequence order. Every layer then processes and
  caches ``S' = S − removed`` tokens, so ``k_l = k`` in every layer.
- **Positions.** ``"keep"`` (default): kept tokens keep their original positions (Qwen's kept tokens
  their (t, h, w) ids), and decoding continues at ``S + t``, exactly as ``generate()`` and
  :func:`~lightkv_cli.runtime.greedy_generate` compute it from their full-length 2-D mask.
  ``"renumber"`` (1-D RoPE only, the published LLaVA code): kept tokens are renumbered contiguously,
  and decode positions are shifted back by ``removed``.
- **Decode.** The caller still holds the full-length mask ``(B, S + t)``; the same pre-hook gathers its
  kept prompt columns and appends the decoded ones (one ``gather`` and one ``cat`` per forward, no host
  read), so the mask, the cache and the positions agree without special cases elsewhere.
- **Record.** :attr:`InputPress.last_prefill` is a
  :class:`~lightkv_cli.methods.records.PrefillRecord` with one stage at ``layer = −1`` (before layer 0),
  ``kept_index`` ``(B, S')`` prompt indices, and ``input_removed`` (what
  :func:`~lightkv_cli.runtime.cache_stats` adds back to find the prompt's text).

Left-padded batches work when every row has the same vision-token layout (same number of inputs, each
with the same number of droppable tokens): each row keeps ``k`` of each input's tokens, so every row
loses the same number and stays aligned, and each row decodes what it decodes alone.

Limits (one clear error each): rows with different vision layouts, ``StaticCache``, chunked prefill
(image tokens after the prefill), ``generate(inputs_embeds=...)`` without ``input_ids``, a 4-D or
dict attention mask handed to the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightkv_cli.errors import UnsupportedInputError, UserError
from lightkv_cli.measure.timing import profile_range
from lightkv_cli.methods.base import POSITION_MODES, Press
from lightkv_cli.methods.hf_compat import (
    cache_from_kwargs,
    check_dynamic_cache,
    refuse_embeds_without_ids,
    refuse_vision_after_prefill,
)
from lightkv_cli.methods.records import PrefillRecord, StageRecord
from lightkv_cli.methods.vision import compact
from lightkv_cli.models.adapters import FamilyAdapter, adapter_for


@dataclass
class _InputState:
    phase: str = "off"  # "pending" (prompt seen by the top model) | "reduced" (prefill shortened) | "off"
    seq_len: int = 0
    input_ids: torch.Tensor | None = None
    cache: Any = None
    kept: torch.Tensor | None = None  # (B, S') long prompt indices the decoder saw
    removed: int = 0  # tokens removed per row (host int)


@dataclass(frozen=True)
class InputSlot:
    """One visual input's droppable vision tokens, as every row of the batch lays them out (host tensors).

    Attributes:
        input: the input's index in prompt order (0-based); in the vision tower's batch, row ``b``'s copy
            of it is item ``b · inputs + input`` (every row has the same layout).
        index: ``(m,)`` long, the tokens' indices among the row's ``n`` vision tokens, sequence order.
        coords: ``(m, 2)`` long, each token's (row, col) on its grid.
        grid: ``(m,)`` long, which of :attr:`grids` each token is on.
        grids: ``(rows, cols)`` of the input's grids (one per LLaVA-1.5 image, two per LLaVA-NeXT image,
            one per Qwen frame).
        inputs: visual inputs per row.
        special: the input's never-dropped vision tokens (LLaVA-NeXT's newlines, a CLS token).
    """

    input: int
    index: torch.Tensor
    coords: torch.Tensor
    grid: torch.Tensor
    grids: list[tuple[int, int]]
    inputs: int
    special: int = 0


def rounded_count(ratio: float, m: int, special: int = 0) -> int:
    """Droppable tokens kept of an input with ``m`` droppable and ``special`` never-dropped vision tokens, so
    that the input keeps ``round(R·(m + special))`` in all (measured retention counts the special tokens as
    kept): ``round(R·(m + s)) − s`` (Python's ``round``), at least 1; ``m`` when ``R ≥ 1``; 0 when ``m ≤ 0``."""
    if m <= 0:
        return 0
    return m if ratio >= 1.0 else min(m, max(1, round(ratio * (m + special)) - special))


def check_share(value: float, what: str) -> float:
    """``value`` as a float in ``(0, 1]``.

    Raises:
        UserError: NaN or outside ``(0, 1]``, naming ``what``.
    """
    value = float(value)
    if math.isnan(value) or not (0.0 < value <= 1.0):
        raise UserError(f"{what} must be in (0, 1], got {value}")
    return value


class InputPress(Press):
    """Base of pre-LLM reduction: select each visual input's kept vision tokens before layer 0.

    Subclasses implement :meth:`kept_count` and :meth:`select` and set ``positions``. Special tokens inside
    a vision run (LLaVA-1.5's CLS with ``vision_feature_select_strategy="full"``, LLaVA-NeXT's newlines)
    are never candidates and always kept.
    """

    positions: str = "keep"

    def _checked(self, value: float, what: str) -> float:
        """A subclass's share parameter, checked (:func:`check_share`), and its ``positions``.

        Raises:
            UserError: either is invalid.
        """
        if self.positions not in POSITION_MODES:
            raise UserError(f"positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        return check_share(value, what)

    # --- what a subclass provides ----------------------------------------------------------
    def kept_count(self, m: int, grids: Sequence[tuple[int, int]] = (), special: int = 0) -> int:
        """Droppable vision tokens kept of a visual input with ``m`` of them on ``grids`` and ``special``
        never-dropped ones (``≤ m``; ``m`` keeps all)."""
        raise NotImplementedError

    def select(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` kept tokens of one visual input in every row.

        Args:
            features: ``(B, m, D)`` projector outputs of the input's droppable tokens, sequence order.
            k: tokens to keep, ``1 ≤ k < m``.

        Returns:
            ``(B, k)`` long indices into ``m``, ascending.
        """
        raise NotImplementedError

    def choose(self, features: torch.Tensor, k: int, slot: InputSlot) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kept tokens of one visual input and, for methods that build new tokens (pooling, merging),
        the embeddings the decoder receives at those positions instead of the originals.

        Args:
            features: ``(B, m, D)`` projector outputs of the input's droppable tokens, sequence order.
            k: tokens to keep, ``1 ≤ k < m``.
            slot: where the input's tokens are (host tensors, the same in every row).

        Returns:
            ``(chosen, values)``: ``(B, k)`` long indices into ``m``, ascending, and ``(B, k, D)`` embeddings
            in ``features``' dtype, or None to keep the chosen tokens' own. Default: :meth:`select`, None.
        """
        return self.select(features, k), None

    def predict(self, model: nn.Module, grids: Sequence[tuple[int, int]] | None = None, special: int = 0) -> list[int]:
        """Predicted vision tokens cached by each decoder layer for one visual input (length ``L``, the same
        ``k`` in every layer); sets ``expected_retention``.

        Args:
            model: the model (depth; its representative image when ``grids`` is None).
            grids: the ``(rows, cols)`` grids of one input (e.g. ``press.last_prefill.grids``); default:
                the family's representative image.
            special: never-dropped vision tokens besides the grids (newlines, CLS), with ``grids``.
        """
        adapter = adapter_for(model)
        if grids is None:
            grids, special = adapter.prediction_grids()
        m = sum(r * c for r, c in grids)
        n = m + special
        kept = special + self.kept_count(m, grids, special)
        self.expected_retention = kept / n if n else 1.0
        return [kept] * adapter.num_layers

    # --- public state ----------------------------------------------------------------------
    @property
    def last_prefill(self) -> PrefillRecord | None:
        """What the last prefill under this press did (None before any prefill); read it after the prefill."""
        rec = getattr(self, "_last_prefill", None)
        return None if rec is None else rec.to_host()

    def replay(self) -> InputPress:
        """The press whose uncached run over a longer input removes the same prompt tokens: ``self``, since
        the selection depends only on the prompt's projector outputs (see
        :meth:`~lightkv_cli.methods.base.SequencePress.replay`)."""
        return self

    # --- hooks -----------------------------------------------------------------------------
    def _register(self, model: nn.Module, adapter: FamilyAdapter) -> list[Any]:
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if self.positions == "renumber" and not adapter.supports_renumber:
            raise UnsupportedInputError(
                f"positions='renumber' needs 1-D RoPE; the {adapter.family} family uses multi-axis positions: "
                "use positions='keep'"
            )
        self._adapter = adapter
        self._state = _InputState()
        self._last_prefill = None
        lm = adapter.language_model
        return [
            model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True),
            lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True),
            lm.register_forward_hook(self._lm_hook),
        ]

    def _detach(self) -> None:
        self._state = _InputState()

    def _top_pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_from_kwargs(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        adapter = self._adapter
        if past == 0:
            if input_ids is None:
                refuse_embeds_without_ids(self, kwargs)
                self._state = _InputState()
                return None
            if cache is not None:
                check_dynamic_cache(cache)
            adapter.check_prompt(input_ids)
            self._state = _InputState(phase="pending", seq_len=input_ids.shape[1], input_ids=input_ids, cache=cache)
            return None
        st = self._state
        refuse_vision_after_prefill(adapter, kwargs, input_ids)
        if st.phase != "reduced":
            st.phase = "off"
            return None
        if cache is not st.cache:
            raise UnsupportedInputError(
                "decoding with a cache that this press did not fill; run the prefill inside the same "
                "`with press(model):` block"
            )
        if kwargs.get("attention_mask") is None and kwargs.get("position_ids") is None:
            # The model would derive positions from the (shorter) cache; a full-length mask of ones keeps
            # the prompt's frame (M-RoPE families read positions from it), and the decoder's hook cuts it.
            ref = input_ids if input_ids is not None else kwargs["inputs_embeds"]
            q = ref.shape[1]
            width = past + st.removed + q
            kwargs["attention_mask"] = torch.ones(ref.shape[0], width, dtype=torch.long, device=ref.device)
            return args, kwargs
        return None

    def _lm_hook(self, module, args, output):
        st = self._state
        if st.phase == "reduced" and st.cache is None:  # the decoder made its own cache
            st.cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)

    def _lm_pre_hook(self, module, args, kwargs):
        st = self._state
        if st.phase == "pending":
            with profile_range("lightkv::prellm"):
                return self._prefill(args, kwargs)
        if st.phase == "reduced":
            return self._decode(args, kwargs)
        return None

    @staticmethod
    def _mask_2d(kwargs: dict) -> torch.Tensor | None:
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
            raise UnsupportedInputError(
                "pre-LLM reduction needs the 2-D attention mask (or none); a prepared 4-D or per-layer-type mask "
                "cannot be shortened: pass the processor's attention_mask"
            )
        return mask

    def _prefill(self, args: tuple, kwargs: dict):
        """Shorten the prompt the decoder receives (see the module docstring); publish the record.

        Raises:
            UnsupportedInputError: rows with different vision layouts, or a mask that is not 2-D.
        """
        st = self._state
        st.phase = "off"
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        adapter = self._adapter
        S = st.seq_len
        pos = kwargs.get("position_ids")
        layouts = adapter.vision_layouts(st.input_ids, inputs_embeds=embeds, position_ids=pos)
        n = layouts[0].count if layouts else 0
        record = PrefillRecord(seq_len=S, vision_tokens=n, num_layers=adapter.num_layers)
        if layouts:
            record.grids, record.owners = list(layouts[0].grids), layouts[0].owners
            record.layout0, record.layouts = layouts[0], list(layouts)
        record.layer_seq_lens, record.layer_vision_tokens = [S] * record.num_layers, [n] * record.num_layers
        self._last_prefill = record
        if not n:
            return None
        slots = self._input_slots(layouts)
        plan = [(slot, self.kept_count(slot.index.numel(), slot.grids, slot.special)) for slot in slots]
        removed = sum(slot.index.numel() - k for slot, k in plan)
        if removed <= 0:
            return None
        mask = self._mask_2d(kwargs)
        device, B = embeds.device, embeds.shape[0]
        positions = torch.stack([lay.positions for lay in layouts]).to(device)  # (B, n)
        mergeable = layouts[0].mergeable.to(device)
        keep_vis = (~mergeable).unsqueeze(0).expand(B, -1).clone()  # (B, n): special tokens always kept
        D = embeds.shape[-1]
        source = embeds
        for slot, k in plan:
            idx = slot.index.to(device)
            if k >= idx.numel():
                keep_vis[:, idx] = True
                continue
            at = positions[:, idx]  # (B, m)
            feats = source.gather(1, at.unsqueeze(-1).expand(-1, -1, D))
            local, values = self.choose(feats, k, slot)
            chosen = idx[local]  # (B, k) indices into n
            keep_vis.scatter_(1, chosen, True)
            if values is not None:  # new tokens at the chosen positions (never in the caller's tensor)
                if embeds is source:
                    embeds = embeds.clone()
                embeds.scatter_(1, at.gather(1, local).unsqueeze(-1).expand(-1, -1, D), values.to(embeds.dtype))
        keep = torch.ones(B, S, dtype=torch.bool, device=device).scatter_(1, positions, keep_vis)
        kept = compact(keep, S - removed)  # (B, S') prompt indices, ascending
        if mask is not None:
            new_mask = mask.gather(1, kept)
        else:
            new_mask = torch.ones(B, S - removed, dtype=torch.long, device=device)
        if self.positions == "renumber":
            new_pos = (new_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            full = pos if pos is not None else torch.arange(S, device=device).unsqueeze(0)
            new_pos = adapter.gather_positions(full, kept)
        kwargs["inputs_embeds"] = embeds.gather(1, kept.unsqueeze(-1).expand(-1, -1, D))
        kwargs["attention_mask"] = new_mask
        kwargs["position_ids"] = new_pos
        n_out = n - removed
        grid = torch.stack([lay.image for lay in layouts]).to(device).gather(1, compact(keep_vis, n_out))
        record.stages.append(
            StageRecord(
                layer=-1,
                seq_len_in=S,
                seq_len_out=S - removed,
                vision_in=n,
                vision_out=n_out,
                pending={"guidance": keep_vis.float(), "grid": grid},
            )
        )
        record.kept_index.append(kept)
        record.input_removed = removed
        record.layer_seq_lens = [S - removed] * record.num_layers
        record.layer_vision_tokens = [n_out] * record.num_layers
        self._state = _InputState(phase="reduced", seq_len=S, cache=st.cache, kept=kept, removed=removed)
        return args, kwargs

    @staticmethod
    def _input_slots(layouts) -> list[InputSlot]:
        """Per visual input (prompt order), where its droppable tokens are (:class:`InputSlot`).

        Raises:
            UnsupportedInputError: rows whose vision tokens are not laid out alike.
        """
        lay0 = layouts[0]
        for b, lay in enumerate(layouts[1:], start=1):
            if (
                lay.count != lay0.count
                or not torch.equal(lay.image, lay0.image)
                or not torch.equal(lay.mergeable, lay0.mergeable)
                or lay.owners != lay0.owners
            ):
                raise UnsupportedInputError(
                    f"row {b} of the batch lays out its vision tokens differently from row 0 (other images, "
                    "image sizes or counts); pre-LLM reduction keeps the same number per image in every row: "
                    "batch prompts with the same images' sizes, or run them one by one"
                )
        grids = list(lay0.grids)
        owner_of_grid = list(range(len(grids))) if lay0.owners is None else list(lay0.owners)
        image = lay0.image.cpu()
        owner = torch.tensor(owner_of_grid, dtype=torch.long)[image]  # (n,)
        droppable = lay0.mergeable.cpu()
        coords = lay0.coords.cpu()
        count = (max(owner_of_grid) + 1) if owner_of_grid else 0
        # Host tensors only, and no boolean indexing (a nonzero): sort by (input, special) so each input's
        # droppable tokens are one run, in sequence order, sized by one bincount read.
        key = owner * 2 + (~droppable).long()
        sizes = torch.bincount(key, minlength=2 * count).view(count, 2).tolist()  # [droppable, special]
        order = torch.argsort(key, stable=True)
        slots = []
        start = 0
        for i, (drop, special) in enumerate(sizes):
            index = order[start : start + drop]
            start += drop + special
            mine = [g for g, o in enumerate(owner_of_grid) if o == i]
            local = [-1] * len(grids)
            for j, g in enumerate(mine):
                local[g] = j
            grid_of = torch.tensor(local, dtype=torch.long)[image[index]]
            slots.append(InputSlot(i, index, coords[index], grid_of, [grids[g] for g in mine], count, special))
        return slots

    def _decode(self, args: tuple, kwargs: dict):
        """Give a later forward the kept prompt columns of the caller's full-length mask (and, with
        ``renumber`` or without caller positions, positions in the prompt's frame)."""
        st = self._state
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = cache_from_kwargs(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        q = embeds.shape[1]
        mask = self._mask_2d(kwargs)
        if mask is not None:
            W = mask.shape[1]
            if past + st.removed + q == W:
                prompt = mask[:, : st.seq_len].gather(1, st.kept.to(mask.device))
                kwargs["attention_mask"] = torch.cat([prompt, mask[:, st.seq_len :]], dim=1)
            elif past + q != W:
                raise UnsupportedInputError(
                    f"an attention mask of {W} columns fits neither the prompt's frame ({past + st.removed + q}) "
                    f"nor the shortened cache ({past + q}); pass the mask generate() builds"
                )
        pos = kwargs.get("position_ids")
        if pos is None:
            offset = 0 if self.positions == "renumber" else st.removed
            kwargs["position_ids"] = (torch.arange(q, device=embeds.device) + past + offset).unsqueeze(0)
        elif self.positions == "renumber":
            kwargs["position_ids"] = pos - st.removed
        return args, kwargs
