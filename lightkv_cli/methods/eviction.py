"""Post-prefill KV eviction: the shared machinery of VL-Cache and SnapKV.

Prefill runs unchanged (same compute, same peak memory). While it runs, each decoder layer's
attention from a few *observation* queries (always a suffix ``[t₀, S)`` of the prompt) to every prompt
key is computed from the layer's own post-RoPE queries and cached keys — ``H·τ·S`` logits per layer,
never an ``S×S`` matrix, and the model keeps running SDPA / flash attention. When the prefill forward
returns, every layer's cache is cut to its budget, per key/value head (each head keeps its own tokens,
every head of a layer the same number, so the cache stays rectangular: ``(B, H_kv, K_l, d)``).
Decoding attends to what is left.

Batches may be left-padded (rows of different question lengths): each row is evicted as it would be
alone. Its statistics see only its real keys and its own observation queries (left padding keeps the
last prompt tokens of every row aligned), its budgets ``k_{l,b}`` are the method's rule applied to its
real length ``S_b`` and its own statistics, and each layer holds ``K_l = max_b k_{l,b}`` slots per head: a
row with fewer entries has leading *filler* slots (−1 in the record's ``kept_index``), masked out of
attention during decoding like left padding, so its decoding is what it would be alone.

Cost (what a GPU pays in kernel launches and pipeline drains): the statistics of a layer are a fixed,
small number of batched tensor ops (no loop over heads, rows or queries; layers are grouped as far as
their keys fit :data:`~lightkv_cli.methods.attention.MAX_CHUNK_BYTES`, and queries are chunked only to
bound the probabilities' memory); the observation masks are built once per prefill; budgets and kept
indices are computed on the device for all rows and layers at once (:func:`select_kept`); the host reads
the device twice per prefill at most — once at the start (each row's padding and vision positions: what
sizes the observation) and once at the end (the ``(B, L)`` integer budgets that size the cut caches, with
the method's statistics for the record) — and never during decoding. The record's tensors stay on the
device until read (:class:`~lightkv_cli.methods.records.EvictionRecord`).

Unlike the in-prefill methods (:class:`~lightkv_cli.methods.base.SequencePress`), eviction may
shorten layer 0 and drops text tokens as well as vision tokens; positions are unaffected (the cached
keys carry their rotary phase, and ``generate()`` and :func:`~lightkv_cli.runtime.greedy_generate`
derive decode positions from the 2-D attention mask, not from the cache length). Decoding layers get
an attention mask built from their own cached length, once per step and distinct length, and none at
all when the model's attention needs none (SDPA, one new token, no padding, no fillers). Layers with
fillers get masks for all their row-budget patterns from one transformers call at the start of the first
decode step, grown by one key per later step.

Limits (clear errors): right padding (pad on the left), ``StaticCache``, chunked prefill,
``generate(inputs_embeds=...)`` without ``input_ids``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightkv_cli.errors import UnsupportedInputError
from lightkv_cli.measure.timing import profile_range
from lightkv_cli.methods import attention
from lightkv_cli.methods.base import Press
from lightkv_cli.methods.eviction_decode import DecodeMasks
from lightkv_cli.methods.eviction_scores import (  # noqa: F401  (re-exported: the methods' shared vocabulary)
    Observation,
    avg_pool_1d,
    check_fraction,
    group_counts,
    group_mean,
    keep_budget,
    layer_chunks,
    observation_attention,
    read_host,
    select_kept,
    select_per_head,
)
from lightkv_cli.methods.hf_compat import (
    cache_from_kwargs,
    check_dynamic_cache,
    refuse_embeds_without_ids,
    refuse_vision_after_prefill,
)
from lightkv_cli.methods.records import EvictionRecord
from lightkv_cli.models.adapters import FamilyAdapter


#: Keyword arguments of a top-level forward that carry new visual input.
@dataclass
class EvictionPlan:
    """What a method decided from every layer's statistics, still on the device.

    Attributes:
        scores: ``(R, B, H_kv, S)`` float32 scores of consecutive layers (higher is kept first), ``Σ R = L``.
        budgets: entries each row keeps per KV head in each layer: a ``(B, L)`` long tensor (on the
            device), or host ints ``B × L``.
        recent: most recent positions each row always keeps in each layer: ``(B, L)`` long tensor, host ints
            ``B × L``, or one int for every row and layer.
        details: method statistics for the record; tensor values are read to the host (as lists, nested
            for 2-D tensors) in the same single read as the budgets. ``row_<name>`` keys hold one value per
            row; the record adds ``<name>`` = row 0's value where the plan gives none.
    """

    scores: list[torch.Tensor]
    budgets: torch.Tensor | list[list[int]]
    recent: torch.Tensor | list[list[int]] | int
    details: dict = field(default_factory=dict)


@dataclass
class PromptRows:
    """Host facts of each row of a (left-padded) prompt batch, read once at the start of the prefill.

    Attributes:
        seq_len: ``S``, the padded length.
        pads: left pads of each row ``p_b``.
        vision: vision tokens of each row ``n_b``.
        starts: each row's first observation position in the padded frame (``p_b + t₀`` of the row alone),
            None for a row the method does not evict (it keeps all its ``S_b`` entries).
    """

    seq_len: int
    pads: list[int]
    vision: list[int]
    starts: list[int | None]

    @property
    def lengths(self) -> list[int]:
        """Real (unpadded) length ``S_b = S − p_b`` of each row."""
        return [self.seq_len - p for p in self.pads]

    @property
    def batch(self) -> int:
        """Rows ``B``."""
        return len(self.pads)

    @property
    def evicted(self) -> list[bool]:
        """Whether each row is evicted."""
        return [s is not None for s in self.starts]


@dataclass
class _EvictState:
    phase: str = "off"  # "prefill" | "decode" | "off"
    seq_len: int = 0
    rows: PromptRows | None = None
    vision: torch.Tensor | None = None  # (B, S) bool, vision positions of every row, on the model's device
    real: torch.Tensor | None = None  # (B, S) bool, real (non-pad) tokens; None without padding
    row_starts: list[int] | None = None  # per row first observed position (padded frame), for the masks
    start: int = 0  # first observation position (of any row)
    group: int = 1  # layers whose statistics are computed together
    obs: dict = field(default_factory=dict)  # device -> Observation
    cache: Any = None
    queries: torch.Tensor | None = None  # (G, B, τ, H·d): the current group's q_proj rows at the observation
    layers: list = field(default_factory=list)  # the current group: (layer, (cos, sin), scale) per layer
    stats: list = field(default_factory=list)  # method statistics of consecutive runs of layers
    done: int = 0  # layers whose statistics are in `stats`
    rope: dict = field(default_factory=dict)  # id(cos) -> (cos, sin, cos and sin at the observation, float32)
    fill: dict = field(default_factory=dict)  # layer -> its row budgets, for layers with filler slots
    slots: list = field(default_factory=list)  # K_l of every layer after eviction
    first_step: bool = False  # the first decode step after an eviction with filler slots is still to come
    masks: dict = field(default_factory=dict)  # decode: (layer type, cached length, fill) -> mask of this step
    #: decode: the step's 2-D mask past the prompt, ``(B, decoded + q)`` (0 at positions a row skips, e.g. a
    #: follow-up turn after rows that ended at different steps), or None (all ones)
    tail: torch.Tensor | None = None
    grown: dict = field(default_factory=dict)  # decode: (layer type, fill) -> (key length, mask, q) of the last step


class EvictionPress(DecodeMasks, Press):
    """Base of post-prefill eviction methods (VL-Cache, SnapKV).

    Subclasses choose the observation queries (:meth:`observation_start`), reduce the attention rows of a
    group of layers to device statistics (:meth:`layer_statistics`), and decide budgets and scores
    (:meth:`plan`). The base captures the observation queries, computes the statistics of groups of
    layers at once (as many as :data:`~lightkv_cli.methods.attention.MAX_CHUNK_BYTES` of probabilities
    allow) without an ``S×S`` matrix, evicts once prefill ends, records an :class:`EvictionRecord` in
    :attr:`last_prefill`, and gives decoding layers masks for their own cached length.
    """

    #: prefill runs unchanged: the first token is the uncompressed model's (first-token metrics n/a)
    changes_prefill = False
    #: positions are never renumbered by eviction (kept for a uniform interface with SequencePress)
    positions: str = "keep"
    #: not predicted: which tokens go depends on the attention, and text is evicted too
    expected_retention: float | None = None
    schedule_note: str = ""

    # --- what a subclass provides ----------------------------------------------------------
    def observation_start(self, seq_len: int, last_vision: int) -> int | None:
        """First observed prompt position ``t₀`` (the queries are ``[t₀, S)``); None: do not evict.

        Args:
            seq_len: prompt length ``S``.
            last_vision: position of the last vision token, −1 without any.
        """
        raise NotImplementedError

    def layer_statistics(
        self, chunks: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], kv_heads: int, obs: Observation
    ) -> Any:
        """Reduce the observation attention of ``R`` consecutive layers (:func:`observation_attention`
        chunks, probabilities ``(B, R, H, c, S)``; ``obs`` says which queries and keys each row has) to
        device tensors with a leading layer axis ``R``, per row (no host read)."""
        raise NotImplementedError

    def plan(self, stats: list[Any], rows: PromptRows) -> EvictionPlan:
        """Budgets and recent windows of every row and layer, and scores of every layer, from the
        statistics of consecutive runs of layers (in layer order; no host read). A row's budgets are what
        the method gives its real prompt alone (length ``S_b``, ``n_b`` vision tokens); a row that
        ``rows`` marks as not evicted keeps ``S_b`` entries in every layer."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The method's parameters, as recorded in results files."""
        raise NotImplementedError

    # --- public state ----------------------------------------------------------------------
    @property
    def last_prefill(self) -> EvictionRecord | None:
        """What the last prefill under this press kept (None before any prefill)."""
        return getattr(self, "_last_prefill", None)

    # --- hooks -----------------------------------------------------------------------------
    def _register(self, model: nn.Module, adapter: FamilyAdapter) -> list[Any]:
        self._adapter = adapter
        self._state = _EvictState()
        self._last_prefill = None
        types = getattr(adapter.text_config, "layer_types", None)
        self._layer_types = [types[i] if types else "full_attention" for i in range(adapter.num_layers)]
        # Only the top-level hooks stay: the per-layer statistics hooks live through one evicting prefill,
        # the per-layer decode pre-hooks from its end to the next prefill (issue 16: no idle hook calls).
        self._prefill_handles: list[Any] = []
        self._decode_handles: list[Any] = []
        return [
            model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True),
            model.register_forward_hook(self._top_post_hook, with_kwargs=True),
        ]

    def _attach_layer_hooks(self, decode: bool) -> None:
        """Attach every layer's decode pre-hook (``decode``) or its q_proj capture and statistics hooks."""
        handles = self._decode_handles if decode else self._prefill_handles
        for i, layer in enumerate(self._adapter.layers) if not handles else ():
            if decode:
                handles.append(layer.register_forward_pre_hook(self._decode_pre_hook(i), with_kwargs=True))
            else:
                handles.append(layer.self_attn.q_proj.register_forward_hook(self._capture_hook(i, layer.self_attn)))
                handles.append(layer.register_forward_hook(self._stats_hook(i), with_kwargs=True))

    def _detach(self) -> None:
        self._remove(self._prefill_handles)
        self._remove(self._decode_handles)
        self._state = _EvictState()

    def _prompt_facts(
        self, input_ids: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[list[int]]]:
        """Every row's vision positions and real tokens, and, in one host read, per row: vision tokens,
        last vision position (−1: none), and (with a 2-D mask) left pads and whether the padding is on the
        left.

        Returns:
            ``(vision, real, facts)``: ``(B, S)`` bool vision positions, ``(B, S)`` bool real tokens (None
            without a 2-D mask) and the host facts, one list of ``B`` ints per fact.
        """
        vis_rows = self._adapter.vision_mask(input_ids)  # (B, S) bool
        S = vis_rows.shape[1]
        facts = [vis_rows.sum(1), torch.where(vis_rows, torch.arange(S, device=vis_rows.device), -1).amax(1)]
        real = None
        if mask is not None and mask.ndim == 2:
            real = mask.to(vis_rows.device).bool()
            facts += [(~real).sum(1), (real[:, 1:] >= real[:, :-1]).all(1)]
        with profile_range("lightkv::host_read"):
            values = torch.stack([f.long() for f in facts]).tolist()
        return vis_rows, real, values

    def _group_size(self, batch: int, seq_len: int, tau: int) -> int:
        """Layers whose statistics are computed together: their float32 keys and observation queries each
        within :data:`~lightkv_cli.methods.attention.MAX_CHUNK_BYTES`, in groups of equal size (their
        probabilities are bounded by the same size by :func:`observation_attention`, which computes them
        in chunks of queries)."""
        cfg = self._adapter.text_config
        H = cfg.num_attention_heads
        Hkv = getattr(cfg, "num_key_value_heads", None) or H
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        per_layer = 4 * batch * d * max(seq_len * Hkv, tau * H)
        L = self._adapter.num_layers
        most = max(1, min(L, attention.MAX_CHUNK_BYTES // max(1, per_layer)))
        return math.ceil(L / math.ceil(L / most))

    def _top_pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_from_kwargs(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        adapter = self._adapter
        st = self._state
        if past == 0:
            self._remove(self._decode_handles)
            if input_ids is None:
                refuse_embeds_without_ids(self, kwargs)
                self._state = _EvictState()
                return None
            if cache is not None:
                check_dynamic_cache(cache)
            mask = kwargs.get("attention_mask")
            vision, real, facts = self._prompt_facts(input_ids, mask)
            B, S = input_ids.shape
            n_vis, last_vis = facts[0], facts[1]
            pads = facts[2] if real is not None else [0] * B
            if real is not None and not all(facts[3]):
                raise UnsupportedInputError(
                    f"{type(self).__name__} supports left-padded batches only (each row's real tokens last); "
                    "pad on the left (tokenizer padding_side='left') or run prompts one at a time"
                )
            starts = []
            for p, last in zip(pads, last_vis):
                t0 = self.observation_start(S - p, last - p if last >= 0 else -1)
                starts.append(t0 + p if t0 is not None and 0 <= t0 < S - p else None)
            rows = PromptRows(S, pads, n_vis, starts)
            L = adapter.num_layers
            if not any(rows.evicted):
                self._state = _EvictState(phase="off", seq_len=S, cache=cache)
                self._last_prefill = EvictionRecord(
                    S,
                    n_vis[0],
                    L,
                    [S] * L,
                    row_budgets=[[n] * L for n in rows.lengths],
                    row_layer_vision_tokens=[[float(n)] * L for n in n_vis],
                    row_seq_lens=rows.lengths,
                )
                return None
            start = min(t for t in starts if t is not None)
            # rows not evicted still get statistics (ignored): from their first real query on
            row_starts = [t if t is not None else max(start, p) for t, p in zip(starts, pads)]
            self._attach_layer_hooks(decode=False)
            self._state = _EvictState(
                phase="prefill",
                seq_len=S,
                rows=rows,
                vision=vision,
                real=real if any(pads) else None,
                row_starts=row_starts,
                start=start,
                group=self._group_size(B, S, S - start),
                cache=cache,
            )
            self._observation(vision.device)
            return None
        refuse_vision_after_prefill(adapter, kwargs, input_ids)
        if st.phase in ("prefill", "decode") and cache is not None and cache is st.cache:
            if st.first_step and input_ids is not None and input_ids.shape[-1] == 1:
                self._first_step_masks(st)  # before any layer adds this step's token to its cache
            st.first_step = False
            st.phase = "decode"
            st.masks = {}
            mask = kwargs.get("attention_mask")
            st.tail = mask[:, st.seq_len :] if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
            if input_ids is not None and input_ids.shape[-1] > 1:
                st.grown = {}  # several new tokens (a follow-up turn, a teacher-forced continuation): rebuilt
            return None
        if st.phase == "decode" and cache is not st.cache:
            raise UnsupportedInputError(
                "decoding with a cache that this press did not fill; run the prefill inside the same "
                "`with press(model):` block"
            )
        st.phase = "off"
        return None

    def _capture_hook(self, layer: int, attn: nn.Module):
        norm = getattr(attn, "q_norm", None)

        def hook(module, args, output):
            st = self._state
            if st.phase != "prefill":
                return None
            slot = layer % st.group
            if slot == 0:
                size = min(st.group, self._adapter.num_layers - layer)
                shape = (size, output.shape[0], st.seq_len - st.start, output.shape[-1])
                buf = st.queries
                if buf is None or buf.shape != shape or buf.dtype != output.dtype or buf.device != output.device:
                    st.queries = torch.empty(shape, dtype=output.dtype, device=output.device)
            q = output[:, st.start :]
            if norm is not None:  # the layer's per-head norm, before RoPE (as its attention applies it)
                q = norm(q.view(*q.shape[:2], -1, attn.head_dim)).flatten(2)
            st.queries[slot].copy_(q)
            return None

        return hook

    def _observation(self, device: torch.device) -> Observation:
        """The prefill's observation on ``device`` (built once per device: a model split over devices)."""
        st = self._state
        obs = st.obs.get(device)
        if obs is None:
            obs = st.obs[device] = Observation.build(st.start, st.seq_len, device, st.real, st.row_starts)
        return obs

    def _observation_rope(self, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` at the observation positions, float32; sliced once per prefill and table (the same
        tables are handed to every layer)."""
        st = self._state
        cos, sin = position_embeddings
        hit = st.rope.get(id(cos))
        if hit is None or hit[0] is not cos or hit[1] is not sin:
            hit = st.rope[id(cos)] = (cos, sin, cos[..., st.start :, :].float(), sin[..., st.start :, :].float())
        return hit[2], hit[3]

    def _stats_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            st = self._state
            if st.phase != "prefill":
                return None
            cache = cache_from_kwargs(kwargs)
            if st.cache is None:
                st.cache = cache
            if cache is None:
                raise UnsupportedInputError(f"{type(self).__name__} needs a KV cache: run with use_cache=True")
            attn = module.self_attn
            scale = float(getattr(attn, "scaling", attn.head_dim**-0.5))
            st.layers.append((layer, kwargs["position_embeddings"], scale))
            if len(st.layers) == st.queries.shape[0]:
                with profile_range("lightkv::evict_stats"):
                    self._group_statistics(st)
            return None

        return hook

    def _group_statistics(self, st: _EvictState) -> None:
        """The statistics of the current group of layers, in runs of layers that share their rotary tables,
        scale and key shape."""
        group, st.layers = st.layers, []
        first = group[0][0]
        i = 0
        while i < len(group):
            layer, pe, scale = group[i]
            keys = st.cache.layers[layer].keys
            j = i + 1
            while (
                j < len(group)
                and group[j][1][0] is pe[0]
                and group[j][1][1] is pe[1]
                and group[j][2] == scale
                and st.cache.layers[group[j][0]].keys.shape == keys.shape
                and st.cache.layers[group[j][0]].keys.device == keys.device
            ):
                j += 1
            if keys.shape[2] != st.seq_len:
                raise UnsupportedInputError(
                    f"{type(self).__name__}: layer {layer} caches {keys.shape[2]} of the prompt's {st.seq_len} "
                    "tokens (a sliding-window cache); eviction needs every layer's whole prompt"
                )
            R = j - i
            run = st.queries[group[i][0] - first : group[j - 1][0] - first + 1]  # (R, B, τ, H·d)
            _, B, tau, hd = run.shape
            d = keys.shape[-1]
            H = hd // d
            q = torch.empty((B, R, H, tau, d), dtype=torch.float32, device=run.device)
            q.copy_(run.view(R, B, tau, H, d).permute(1, 0, 3, 2, 4))
            q = q.view(B, R * H, tau, d)
            cos, sin = self._observation_rope(pe)
            q = self._adapter.rotary_function(layer)(q, q[:, :1], cos, sin)[0]
            k = torch.stack([st.cache.layers[g[0]].keys for g in group[i:j]], dim=1) if R > 1 else keys.unsqueeze(1)
            obs = self._observation(keys.device)
            chunks = observation_attention(q, k, obs, scale)
            st.stats.append(self.layer_statistics(chunks, keys.shape[1], obs))
            st.done += R
            i = j

    def _top_post_hook(self, module, args, kwargs, output):
        st = self._state
        if st.phase != "prefill":
            return None
        with profile_range("lightkv::evict"):
            self._evict(st)
        st.phase = "decode"
        self._remove(self._prefill_handles)
        self._attach_layer_hooks(decode=True)
        return None

    def _evict(self, st: _EvictState) -> None:
        L = self._adapter.num_layers
        if st.done != L or st.cache is None:
            raise RuntimeError(f"internal error: statistics of {st.done} of {L} layers were gathered")
        rows = st.rows
        plan = self.plan(st.stats, rows)
        st.stats, st.queries, st.rope = [], None, {}
        budgets, recent = plan.budgets, plan.recent
        B, S = rows.batch, st.seq_len
        # every layer's kept indices, on the device, in groups of layers of bounded memory
        picked, vis = [], []
        vis_ext = torch.cat([st.vision.new_zeros(B, 1), st.vision], dim=1).float()  # (B, 1 + S): filler −1 first
        l0 = 0
        for run in plan.scores:
            for a, b in layer_chunks(run.shape[0], 40 * run[0].numel()):
                g0, g1 = l0 + a, l0 + b
                scores = run[a:b] if b - a < run.shape[0] else run
                k = group_counts(budgets, g0, g1, scores)
                r = group_counts(recent, g0, g1, scores)
                idx = select_kept(scores, k, r, st.real, fillers_first=True)  # (G, B, H_kv, S), fillers −1 first
                ext = vis_ext if vis_ext.device == idx.device else vis_ext.to(idx.device)
                G, _, Hkv, _ = idx.shape
                kept_vis = ext.view(1, B, 1, S + 1).expand(G, B, Hkv, S + 1).gather(-1, idx + 1)
                vis.append(kept_vis.sum(-1).mean(-1).to(vis_ext.device))  # (G, B)
                picked.extend(idx.unbind(0))
            l0 += run.shape[0]
        # the one host read of the end of prefill: the budgets that size the caches, and the details
        row_budgets, details = read_host(budgets, plan.details)
        if len(row_budgets) != B or any(len(r) != L for r in row_budgets) or len(picked) != L:
            raise RuntimeError(
                f"internal error: budgets of {len(row_budgets)} rows and indices of {len(picked)} of {L} layers"
            )
        for key in [k for k in details if k.startswith("row_")]:
            details.setdefault(key[4:], details[key][0])
        slots = st.slots = [max(col) for col in zip(*row_budgets)]  # K_l
        kept, firsts = [], {}
        st.fill = {}
        for i, (idx, k) in enumerate(zip(picked, slots)):
            layer = st.cache.layers[i]
            keys, values = layer.keys, layer.values
            idx = idx[..., S - k :]
            kept.append(idx if idx.device == st.vision.device else idx.to(st.vision.device))
            per_row = tuple(r[i] for r in row_budgets)
            filled = any(n < k for n in per_row)
            if k == keys.shape[-2] and not filled:  # every row keeps everything: the cache as it is
                continue
            if idx.device != keys.device:
                idx = idx.to(keys.device)
            if filled:  # filler slots (index −1) hold a copy of the row's first real entry, masked in decode
                first = firsts.get(keys.device)
                if first is None:
                    first = firsts[keys.device] = torch.tensor(rows.pads, device=keys.device).view(B, 1, 1)
                idx = torch.maximum(idx, first)
                st.fill[i] = per_row
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            layer.keys = keys.gather(2, gather)
            if values.shape[-1] != keys.shape[-1]:
                gather = idx.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1])
            layer.values = values.gather(2, gather)
        st.grown, st.first_step = {}, bool(st.fill)
        self._last_prefill = EvictionRecord(
            seq_len=S,
            vision_tokens=rows.vision[0],
            num_layers=L,
            budgets=slots,
            kept_index=torch.cat(kept, dim=-1),  # (B, H_kv, Σ K_l): one tensor, split when read
            details=details,
            row_budgets=row_budgets,
            row_layer_vision_tokens=(torch.cat(vis) if len(vis) > 1 else vis[0]).T,  # (B, L)
            row_seq_lens=rows.lengths,
        )
