"""Shared machinery of compression methods: attaching hooks, shortening the sequence during prefill.

Every method is a dataclass whose fields are its hyperparameters. Calling it on a model returns a
context manager that registers forward hooks and removes them on exit, also on error::

    with press(model):
        model.generate(**inputs, max_new_tokens=32)

No model code is copied or patched: only ``register_forward_pre_hook`` / ``register_forward_hook``
(with ``with_kwargs=True``) on the top model and on decoder layers.

:class:`SequencePress` is the base of methods that shorten the sequence *inside* the decoder during
prefill (LightKV, FastV, RandomDrop). A subclass says after which decoder layers it
acts (:meth:`SequencePress.stage_layers`) and which tokens survive (:meth:`SequencePress.reduce`);
the base does the rest, identically for every such method:

- the layer's output is replaced by the shorter hidden states; the layer itself has already cached
  the full sequence, later layers cache only what they process (``DynamicCache`` layers grow
  independently), and layer 0 is never shortened so ``generate()`` keeps deriving positions and the
  2-D mask from the uncompressed length;
- later layers get the attention mask rebuilt for the shorter sequence (padding included) with
  ``transformers.masking_utils`` (:func:`~lightkv_cli.methods.hf_compat.causal_mask`), and the
  position embeddings gathered at the surviving positions (``positions="keep"``) or recomputed for renumbered positions
  (``positions="renumber"``, 1-D RoPE only);
- during decode, compressed layers get a mask built from their own cached length, and with
  ``renumber`` positions shifted back by the number of removed tokens;
- what happened is recorded in :attr:`SequencePress.last_prefill` (a
  :class:`~lightkv_cli.methods.records.PrefillRecord`).

What depends on the transformers version (the cache keyword, mask construction, cache types) lives in
:mod:`lightkv_cli.methods.hf_compat`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightkv_cli.errors import UnsupportedInputError
from lightkv_cli.measure.timing import profile_range
from lightkv_cli.methods.hf_compat import (
    cache_from_kwargs,
    causal_mask,
    check_dynamic_cache,
    refuse_embeds_without_ids,
    refuse_vision_after_prefill,
)
from lightkv_cli.methods.records import PrefillRecord, StageRecord
from lightkv_cli.methods.vision import VisionTokens, compact
from lightkv_cli.models.adapters import FamilyAdapter, adapter_for

POSITION_MODES = ("keep", "renumber")


class Press:
    """Base class of every compression method. Subclasses are dataclasses of hyperparameters.

    ``press(model)`` returns a context manager that attaches the method's hooks to ``model`` and
    removes them when the block exits, whether normally or by an exception.
    """

    #: whether the method changes what prefill computes (and so the first generated token); False for
    #: post-prefill eviction, whose first-token metrics are then not applicable
    changes_prefill = True

    def __call__(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self._attached(model)

    @contextlib.contextmanager
    def _attached(self, model: nn.Module) -> Iterator[nn.Module]:
        adapter = adapter_for(model)
        handles: list[Any] = []
        try:
            handles.extend(self._register(model, adapter))
            yield model
        finally:
            self._remove(handles)
            self._detach()

    @staticmethod
    def _remove(handles: list[Any]) -> None:
        """Remove hooks by their handles and empty the list (methods attach some hooks only per phase)."""
        for h in handles:
            h.remove()
        handles.clear()

    def _register(self, model: nn.Module, adapter: FamilyAdapter) -> list[Any]:
        raise NotImplementedError

    def _detach(self) -> None:
        """Drop per-model state after the hooks are removed."""


@dataclass
class StageInput:
    """Everything a stage may use, handed to :meth:`SequencePress.reduce`.

    Attributes:
        layer: decoder layer after which it runs.
        hidden: ``(B, S, D)`` the layer's output hidden states.
        vision: the current vision tokens of every row, on the model's device
            (:class:`~lightkv_cli.methods.vision.VisionTokens`; positions index ``hidden``'s sequence axis).
        attention_mask_2d: ``(B, S)`` 1 for real tokens, 0 for padding.
        position_embeddings: ``(cos, sin)``, each ``(B, S, head_dim)``, as the layer used them.
        queries: ``(B, S, H·d)`` output of the layer's ``q_proj`` (pre-norm, pre-RoPE), or None.
        keys: ``(B, S, H_kv·d)`` output of the layer's ``k_proj`` (pre-norm, pre-RoPE), or None.
        module: the decoder layer.
    """

    layer: int
    hidden: torch.Tensor
    vision: VisionTokens
    attention_mask_2d: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    queries: torch.Tensor | None
    keys: torch.Tensor | None
    module: nn.Module


@dataclass
class StageOutput:
    """A stage's decision.

    Attributes:
        keep: ``(B, S)`` bool, tokens that survive; every row removes exactly ``removed`` vision
            tokens (mergeable ones only) and no text.
        removed: tokens removed per row (a host int, ``≥ 1``: return None from ``reduce`` instead of
            removing nothing).
        hidden: ``(B, S, D)`` hidden states to gather the survivors from (merged values written in
            place of their B token).
        guidance: ``(B, n_vision)`` float32 weights used, for the record (optional, on the device).
        pairs: ``(B, m, 2)`` long positions in the current sequence of (merged token, token it
            merged into), for the record (optional, on the device).
    """

    keep: torch.Tensor
    removed: int
    hidden: torch.Tensor
    guidance: torch.Tensor | None = None
    pairs: torch.Tensor | None = None


@dataclass
class _Group:
    """State of the layers after one stage (they all see the same shorter sequence)."""

    first_layer: int
    seq_len: int
    mask_2d: torch.Tensor  # (B, S_k) long, padding of the surviving tokens
    orig_index: torch.Tensor  # (B, S_k) long into the prompt
    position_ids: torch.Tensor  # (B, S_k)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    removed: int  # tokens removed relative to the prompt (same for every row)
    masks: dict = field(default_factory=dict)  # per forward: layer type -> mask


@dataclass
class _ForwardState:
    phase: str  # "pending" (prompt seen, layouts not yet) | "prefill" | "decode" | "off"
    seq_len: int = 0
    input_ids: torch.Tensor | None = None
    mask_2d: torch.Tensor | None = None  # prefill: (B, S); decode: (B, past + q) as passed to the model
    vision: VisionTokens | None = None
    cache: Any = None
    groups: list[_Group] = field(default_factory=list)
    group_of: dict[int, _Group] = field(default_factory=dict)  # decoder layer -> the group it belongs to
    record: PrefillRecord | None = None
    captured: dict = field(default_factory=dict)  # layer -> {"q": ..., "k": ...}


class SequencePress(Press):
    """Base of methods that shorten the sequence inside the decoder during prefill.

    Subclasses implement :meth:`stage_layers` and :meth:`reduce`, and set ``positions``.
    ``needs_qk`` (class attribute) asks the base to capture the stage layers' ``q_proj`` and
    ``k_proj`` outputs during prefill (for attention-based guidance) without changing the
    model's attention implementation.
    """

    positions: str = "keep"
    needs_qk: bool = False

    # --- what a subclass provides ----------------------------------------------------------
    def stage_layers(self, num_layers: int) -> list[int]:
        """Decoder layers (0-based, increasing) after which :meth:`reduce` runs, for an ``L``-layer model."""
        raise NotImplementedError

    def reduce(self, inp: StageInput) -> StageOutput | None:
        """Decide which tokens survive this stage; None (or keeping everything) means no change."""
        raise NotImplementedError

    def validate(self, adapter: FamilyAdapter) -> None:
        """Raise ``UserError`` when the schedule does not fit the model."""

    def replay(self) -> SequencePress:
        """A press that makes the last prefill's decisions again when run over a longer input.

        Running the returned press, uncached, over the prompt followed by generated tokens removes the
        same prompt tokens the last prefill removed, which is how cached decoding is checked against an
        uncached reference forward (the tests do this for every method). Default: ``self``, right for
        methods whose decisions depend only on the prompt's vision tokens (RandomDrop's seeded draws);
        methods guided by attention, which later tokens change, return a copy that replays what they
        recorded (LightKV, FastV).
        """
        return self

    # --- public state ----------------------------------------------------------------------
    @property
    def last_prefill(self) -> PrefillRecord | None:
        """What the last prefill under this press did (None before any prefill).

        Reading it copies what the stages recorded on the device to the host (once per prefill);
        read it after the prefill, outside any timed region.
        """
        rec = getattr(self, "_last_prefill", None)
        return None if rec is None else rec.to_host()

    # --- hooks -----------------------------------------------------------------------------
    def _register(self, model: nn.Module, adapter: FamilyAdapter) -> list[Any]:
        self._prefill_handles: list[Any] = []
        self._layer_handles: list[Any] = []
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if self.positions == "renumber" and not adapter.supports_renumber:
            raise UnsupportedInputError(
                f"positions='renumber' needs 1-D RoPE; the {adapter.family} family uses multi-axis positions: "
                "use positions='keep'"
            )
        self.validate(adapter)
        self._adapter = adapter
        self._state = _ForwardState(phase="off")
        self._last_prefill = None
        self._stages = self.stage_layers(adapter.num_layers)
        # Only this hook stays: prefill's (layouts, stages, q/k) live from a prefill's start to its first
        # decode step, the compressed layers' from a stage's first cut to the next prefill (issue 16).
        return [model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True)]

    def _attach_prefill_hooks(self) -> None:
        if self._prefill_handles:
            return
        adapter, add = self._adapter, self._prefill_handles.append
        # The vision layout is read where the decoder's inputs are complete (image features in the
        # embeddings, M-RoPE positions): the language model's own pre-hook.
        add(adapter.language_model.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True))
        for lay in self._stages:
            add(adapter.layers[lay].register_forward_hook(self._stage_hook(lay), with_kwargs=True))
            if self.needs_qk:
                attn = adapter.layers[lay].self_attn
                add(attn.q_proj.register_forward_hook(self._capture_hook(lay, "q")))
                add(attn.k_proj.register_forward_hook(self._capture_hook(lay, "k")))

    def _attach_layer_hooks(self, first_layer: int) -> None:
        layers = self._adapter.layers  # once, from the first group's layer on (later groups follow it)
        for lay in range(first_layer, len(layers)) if not self._layer_handles else ():
            self._layer_handles.append(
                layers[lay].register_forward_pre_hook(self._layer_pre_hook(lay), with_kwargs=True)
            )

    def _detach(self) -> None:
        self._remove(self._prefill_handles)
        self._remove(self._layer_handles)
        self._state = _ForwardState(phase="off")

    def _capture_hook(self, layer: int, what: str):
        def hook(module, args, output):
            st = self._state
            if st.phase == "prefill":
                st.captured.setdefault(layer, {})[what] = output

        return hook

    def _top_pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_from_kwargs(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        adapter = self._adapter
        if past == 0:
            self._remove(self._layer_handles)  # a new prefill: its own stages decide which layers shrink
            if input_ids is None:
                refuse_embeds_without_ids(self, kwargs)
                self._state = _ForwardState(phase="off")
                return None
            if cache is not None:
                check_dynamic_cache(cache)
            B, S = input_ids.shape[:2]
            mask = kwargs.get("attention_mask")
            if mask is None or mask.ndim != 2:
                mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
            adapter.check_prompt(input_ids)
            self._attach_prefill_hooks()
            # Layouts are found in the language model's pre-hook (``_lm_pre_hook``).
            self._state = _ForwardState(phase="pending", seq_len=S, mask_2d=mask, cache=cache, input_ids=input_ids)
            return None
        # decode (or a continued prefill)
        self._remove(self._prefill_handles)
        st = self._state
        refuse_vision_after_prefill(adapter, kwargs, input_ids)
        if st.phase in ("prefill", "decode") and st.groups and cache is st.cache:
            mask = kwargs.get("attention_mask")
            st.phase = "decode"
            st.mask_2d = mask if (mask is not None and mask.ndim == 2) else None
            for g in st.groups:
                g.masks = {}
            return None
        if st.groups and cache is not st.cache:
            raise UnsupportedInputError(
                "decoding with a cache that this press did not fill; run the prefill inside the same "
                "`with press(model):` block"
            )
        st.phase = "off"
        return None

    def _lm_pre_hook(self, module, args, kwargs):
        """Prefill: locate the vision tokens in what the decoder receives and start the record.

        The only place a press reads the device before its stages: the adapter finds each row's vision
        tokens (once per prefill); stages then work on :class:`VisionTokens` on the device.

        Raises:
            UnsupportedInputError: rows with different vision-token counts (padding the reduced
                sequences of such rows is not implemented: each row would need its own stage
                schedule and mask), or a vision run the adapter cannot place on a grid.
        """
        st = self._state
        if st.phase != "pending":
            return None
        adapter = self._adapter
        input_ids = st.input_ids
        layouts = adapter.vision_layouts(
            input_ids, inputs_embeds=kwargs.get("inputs_embeds"), position_ids=kwargs.get("position_ids")
        )
        counts = {lay.count for lay in layouts}
        if len(counts) > 1:
            raise UnsupportedInputError(
                f"rows of the batch have different vision-token counts ({sorted(counts)}); "
                f"{type(self).__name__} needs the same count in every row: batch prompts with the same "
                "number of images (of the same size for dynamic-resolution models), or run them one by one"
            )
        S = st.seq_len
        n_vis = layouts[0].count if layouts else 0
        record = PrefillRecord(seq_len=S, vision_tokens=n_vis, num_layers=adapter.num_layers)
        vision = None
        if layouts:
            record.grids = list(layouts[0].grids)
            record.owners = layouts[0].owners
            record.layout0 = layouts[0]  # input_tokens, special_tokens: computed when the record is read
            record.layouts = list(layouts)  # every row's, for the per-row fields (also when read)
        if n_vis:
            # The last prompt token predicts the first answer token: VisionTokens never merges it away.
            vision = VisionTokens.from_layouts(layouts, input_ids.device, S)
        self._state = _ForwardState(
            phase="prefill" if n_vis else "off",
            seq_len=S,
            mask_2d=st.mask_2d,
            vision=vision,
            cache=st.cache,
            record=record,
        )
        self._finish_record(self._state)
        return None

    def _stage_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            # Named range so `torch.profiler` shows what the compression step costs (benchmarks).
            with profile_range("lightkv::stage"):
                return self._run_stage(layer, module, args, kwargs, output)

        return hook

    def _run_stage(self, layer: int, module, args, kwargs, output):
        st = self._state
        if st.phase != "prefill":
            return None
        if st.cache is None:
            st.cache = cache_from_kwargs(kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        if st.groups:
            g = st.groups[-1]
            mask_2d, pos_emb = g.mask_2d, g.position_embeddings
        else:
            mask_2d = st.mask_2d
            pos_emb = kwargs["position_embeddings"]
        captured = st.captured.pop(layer, {})
        result = self.reduce(
            StageInput(
                layer=layer,
                hidden=hidden,
                vision=st.vision,
                attention_mask_2d=mask_2d,
                position_embeddings=pos_emb,
                queries=captured.get("q"),
                keys=captured.get("k"),
                module=module,
            )
        )
        if result is None or result.removed <= 0:
            return None
        record = st.record
        n_in = st.vision.count
        seq_in = hidden.shape[1]
        pending = {}
        if result.pairs is not None:
            pending["pairs"] = result.pairs  # mapped to prompt indices when the record is read
            if st.groups:
                pending["pairs_index"] = st.groups[-1].orig_index
        if result.guidance is not None:
            pending["guidance"] = result.guidance
        new_hidden, group = self._apply(st, layer, result, kwargs)
        pending["grid"] = st.vision.grid  # (B, n_out): per-row inputs_out, counted when the record is read
        record.stages.append(
            StageRecord(
                layer=layer,
                seq_len_in=seq_in,
                seq_len_out=group.seq_len,
                vision_in=n_in,
                vision_out=st.vision.count,
                pending=pending,
            )
        )
        record.kept_index.append(group.orig_index)
        self._finish_record(st)
        if isinstance(output, tuple):
            return (new_hidden,) + tuple(output[1:])
        return new_hidden

    def _finish_record(self, st: _ForwardState) -> None:
        """(Re)compute the per-layer counts of the record from its stages; publish it."""
        rec = st.record
        L = rec.num_layers
        seq = [rec.seq_len] * L
        vis = [rec.vision_tokens] * L
        for s in rec.stages:
            for lay in range(s.layer + 1, L):
                seq[lay] = s.seq_len_out
                vis[lay] = s.vision_out
        rec.layer_seq_lens, rec.layer_vision_tokens = seq, vis
        self._last_prefill = rec

    def _apply(self, st: _ForwardState, layer: int, result: StageOutput, kwargs):
        """Gather the survivors and start a new layer group after ``layer`` (no host synchronisation)."""
        keep, hidden = result.keep, result.hidden
        S, D = hidden.shape[1:]
        new_pos_of_old = keep.cumsum(1) - 1  # (B, S): a survivor's position in the shorter sequence
        idx = compact(keep, S - result.removed, new_pos_of_old)  # (B, S') in sequence order
        new_hidden = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, D))
        prev = st.groups[-1] if st.groups else None
        if prev is None:
            mask_2d = st.mask_2d
            orig_index = None  # the stage's input is the prompt itself
            pos_ids = kwargs.get("position_ids")
            if pos_ids is None:
                pos_ids = torch.arange(S, device=hidden.device).unsqueeze(0)
            cos, sin = kwargs["position_embeddings"]
        else:
            mask_2d, orig_index, pos_ids = prev.mask_2d, prev.orig_index, prev.position_ids
            cos, sin = prev.position_embeddings
        mask_2d = mask_2d.gather(1, idx)
        orig_index = idx if orig_index is None else orig_index.gather(1, idx)
        removed = st.seq_len - idx.shape[1]
        if self.positions == "keep":
            # Multi-axis (M-RoPE) ids and tables are gathered on their sequence axis by the adapter.
            pos_ids = self._adapter.gather_positions(pos_ids, idx)
            cos, sin = self._adapter.gather_position_embeddings((cos, sin), idx)
        else:
            pos_ids = (mask_2d.long().cumsum(-1) - 1).clamp(min=0)
            cos, sin = self._adapter.language_model.rotary_emb(new_hidden, pos_ids)
        st.vision = st.vision.select(keep, result.removed, new_pos_of_old)
        group = _Group(
            first_layer=layer + 1,
            seq_len=idx.shape[1],
            mask_2d=mask_2d,
            orig_index=orig_index,
            position_ids=pos_ids,
            position_embeddings=(cos, sin),
            removed=removed,
        )
        st.groups.append(group)
        st.group_of.update(dict.fromkeys(range(group.first_layer, self._adapter.num_layers), group))
        self._attach_layer_hooks(group.first_layer)
        return new_hidden, group

    @staticmethod
    def _mask_2d(st: _ForwardState, g: _Group, hidden: torch.Tensor, cache, layer: int) -> torch.Tensor:
        """2-D padding mask of a compressed layer: its surviving prompt tokens, then decoded tokens."""
        if st.phase == "prefill":
            return g.mask_2d
        if st.mask_2d is not None:
            tail = st.mask_2d[:, st.seq_len :]
        else:
            past_here = cache.get_seq_length(layer) if cache is not None else 0
            tail = torch.ones(g.mask_2d.shape[0], past_here - g.seq_len + hidden.shape[1], device=g.mask_2d.device)
        return torch.cat([g.mask_2d, tail.to(g.mask_2d.dtype)], dim=1)

    def _layer_pre_hook(self, layer: int):
        config = self._adapter.text_config
        types = getattr(config, "layer_types", None)
        layer_type = types[layer] if types else "full_attention"

        def hook(module, args, kwargs):
            st = self._state
            if st.phase not in ("prefill", "decode"):
                return None
            g = st.group_of.get(layer)
            if g is None:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if kwargs.get("attention_mask") is None:
                # The model found no mask necessary (no padding anywhere, and one new token or as many
                # queries as keys: SDPA's own causal masking is exact); a compressed layer, whose
                # survivors stay in sequence order, needs none either.
                mask = None
            else:
                mask = g.masks.get(layer_type, _MISSING)
                if mask is _MISSING:
                    cache = cache_from_kwargs(kwargs)
                    with profile_range("lightkv::mask"):
                        mask = causal_mask(
                            config, layer_type, hidden, self._mask_2d(st, g, hidden, cache, layer), cache, layer
                        )
                    g.masks[layer_type] = mask
            kwargs["attention_mask"] = mask
            if st.phase == "prefill":
                kwargs["position_ids"] = g.position_ids
                kwargs["position_embeddings"] = g.position_embeddings
            elif self.positions == "renumber":
                key = "renumber_positions"
                if key not in g.masks:
                    pos = kwargs.get("position_ids")
                    if pos is None:
                        cache = cache_from_kwargs(kwargs)
                        past_here = cache.get_seq_length(layer) if cache is not None else g.seq_len
                        pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0) + past_here + g.removed
                    pos = pos - g.removed
                    g.masks[key] = (pos, self._adapter.language_model.rotary_emb(hidden, pos))
                kwargs["position_ids"], kwargs["position_embeddings"] = g.masks[key]
            return args, kwargs

        return hook


_MISSING = object()
