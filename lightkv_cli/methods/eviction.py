"""Post-prefill KV eviction: the shared machinery of VL-Cache and SnapKV.

Prefill runs unchanged (same compute, same peak memory). While it runs, each decoder layer's
attention from a few *observation* queries (always a suffix ``[t₀, S)`` of the prompt) to every prompt
key is computed from the layer's own post-RoPE queries and cached keys — ``H·τ·S`` logits per layer,
never an ``S×S`` matrix, and the model keeps running SDPA / flash attention. When the prefill forward
returns, every layer's cache is cut to its budget, per key/value head (each head keeps its own tokens,
every head of a layer the same number, so the cache stays rectangular: ``(B, H_kv, k_l, d)``).
Decoding attends to what is left.

Cost (what a GPU pays in kernel launches and pipeline drains): the statistics of a layer are a fixed,
small number of batched tensor ops (no loop over heads, rows or queries; queries are chunked only to
bound memory, :data:`~lightkv_cli.methods.attention.MAX_CHUNK_BYTES`); the observation masks are built
once per prefill; budgets and kept indices are computed on the device for all layers at once
(:func:`select_kept`); the host reads the device twice per prefill at most — once at the start (padding,
vision positions: what sizes the observation) and once at the end (the integer budgets ``k_l`` that size
the cut caches, with the method's statistics for the record) — and never during decoding. The record's
tensors stay on the device until read (:class:`~lightkv_cli.methods.records.EvictionRecord`).

Unlike the in-prefill methods (:class:`~lightkv_cli.methods.base.SequencePress`), eviction may
shorten layer 0 and drops text tokens as well as vision tokens; positions are unaffected (the cached
keys carry their rotary phase, and ``generate()`` and :func:`~lightkv_cli.runtime.greedy_generate`
derive decode positions from the 2-D attention mask, not from the cache length). Decoding layers get
an attention mask built from their own cached length, once per step and distinct length, and none at
all when the model's attention needs none (SDPA, one new token, no padding).

Limits (clear errors): batches with padding (rows would need different budgets), ``StaticCache``,
chunked prefill, ``generate(inputs_embeds=...)`` without ``input_ids``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightkv_cli.errors import UnsupportedInputError
from lightkv_cli.methods import attention
from lightkv_cli.methods.base import Press
from lightkv_cli.methods.eviction_scores import (  # noqa: F401  (re-exported: the methods' shared vocabulary)
    Observation,
    avg_pool_1d,
    check_fraction,
    group_mean,
    keep_budget,
    observation_attention,
    select_kept,
    select_per_head,
)
from lightkv_cli.methods.hf_compat import cache_from_kwargs, causal_mask, check_dynamic_cache
from lightkv_cli.methods.records import EvictionRecord
from lightkv_cli.models.adapters import FamilyAdapter

#: Keyword arguments of a top-level forward that carry new visual input.
_VISUAL_KWARGS = ("pixel_values", "pixel_values_videos", "image_embeds", "video_embeds")


@dataclass
class EvictionPlan:
    """What a method decided from every layer's statistics, still on the device.

    Attributes:
        scores: ``(R, B, H_kv, S)`` float32 scores of consecutive layers (higher is kept first), ``Σ R = L``.
        budgets: ``(L,)`` long entries each layer keeps per KV head (on the device), or ``L`` ints.
        recent: ``(L,)`` long most recent positions each layer always keeps, or one int for every layer.
        details: method statistics for the record; tensor values are read to the host (as lists) in the
            same single read as the budgets.
    """

    scores: list[torch.Tensor]
    budgets: torch.Tensor | list[int]
    recent: torch.Tensor | int
    details: dict = field(default_factory=dict)


@dataclass
class _EvictState:
    phase: str = "off"  # "prefill" | "decode" | "off"
    seq_len: int = 0
    vision_tokens: int = 0
    vision: torch.Tensor | None = None  # (S,) bool, vision positions (same in every row), on the model's device
    start: int = 0  # first observation position
    group: int = 1  # layers whose statistics are computed together
    obs: dict = field(default_factory=dict)  # device -> Observation
    cache: Any = None
    queries: torch.Tensor | None = None  # (G, B, τ, H·d): the current group's q_proj rows at the observation
    layers: list = field(default_factory=list)  # the current group: (layer, (cos, sin), scale) per layer
    stats: list = field(default_factory=list)  # method statistics of consecutive runs of layers
    done: int = 0  # layers whose statistics are in `stats`
    rope: dict = field(default_factory=dict)  # id(cos) -> (cos, sin, cos and sin at the observation, float32)
    masks: dict = field(default_factory=dict)  # decode: (layer type, cached length) -> mask of this step


class EvictionPress(Press):
    """Base of post-prefill eviction methods (VL-Cache, SnapKV).

    Subclasses choose the observation queries (:meth:`observation_start`), reduce the attention rows of a
    group of layers to device statistics (:meth:`layer_statistics`), and decide budgets and scores
    (:meth:`plan`). The base captures the observation queries, computes the statistics of groups of
    layers at once (as many as :data:`~lightkv_cli.methods.attention.MAX_CHUNK_BYTES` of probabilities
    allow) without an ``S×S`` matrix, evicts once prefill ends, records an :class:`EvictionRecord` in
    :attr:`last_prefill`, and gives decoding layers masks for their own cached length.
    """

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

    def layer_statistics(self, chunks: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], kv_heads: int) -> Any:
        """Reduce the observation attention of ``R`` consecutive layers (:func:`observation_attention`
        chunks, probabilities ``(B, R, H, c, S)``) to device tensors with a leading layer axis ``R``
        (no host read)."""
        raise NotImplementedError

    def plan(self, stats: list[Any], seq_len: int, vision_tokens: int) -> EvictionPlan:
        """Budgets, recent windows and scores of every layer from the statistics of consecutive runs of
        layers (in layer order; no host read)."""
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
        handles = [
            model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True),
            model.register_forward_hook(self._top_post_hook, with_kwargs=True),
        ]
        for i, layer in enumerate(adapter.layers):
            handles.append(layer.self_attn.q_proj.register_forward_hook(self._capture_hook(i, layer.self_attn)))
            handles.append(layer.register_forward_hook(self._stats_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_pre_hook(self._decode_pre_hook(i), with_kwargs=True))
        return handles

    def _detach(self) -> None:
        self._state = _EvictState()

    def _prompt_facts(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        """The prompt's vision positions and, in one host read: same vision positions in every row, vision
        tokens per row, last vision position (−1: none), and (with a 2-D mask) no padding."""
        vis_rows = self._adapter.vision_mask(input_ids)  # (B, S) bool
        vision = vis_rows[0]
        S = vision.shape[0]
        facts = [
            vis_rows.eq(vision).all(),
            vision.sum(),
            torch.where(vision, torch.arange(S, device=vision.device), -1).max(),
        ]
        if mask is not None and mask.ndim == 2:
            facts.append(mask.bool().all().to(vision.device))
        with torch.profiler.record_function("lightkv::host_read"):
            values = torch.stack([f.long() for f in facts]).tolist()
        return vision, values

    def _group_size(self, batch: int, seq_len: int, tau: int) -> int:
        """Layers whose statistics are computed together: their float32 probabilities and keys each within
        :data:`~lightkv_cli.methods.attention.MAX_CHUNK_BYTES`, in groups of equal size."""
        cfg = self._adapter.text_config
        H = cfg.num_attention_heads
        Hkv = getattr(cfg, "num_key_value_heads", None) or H
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        per_layer = 4 * batch * seq_len * max(H * tau, Hkv * d)
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
            if input_ids is None:
                if kwargs.get("inputs_embeds") is not None:
                    raise UnsupportedInputError(
                        f"{type(self).__name__} needs input_ids to find the vision tokens; "
                        "generate(inputs_embeds=...) without input_ids is not supported: pass input_ids"
                    )
                self._state = _EvictState()
                return None
            if cache is not None:
                check_dynamic_cache(cache)
            mask = kwargs.get("attention_mask")
            vision, facts = self._prompt_facts(input_ids, mask)
            same_rows, n_vis, last_vis = facts[:3]
            if len(facts) > 3 and not facts[3]:
                raise UnsupportedInputError(
                    f"{type(self).__name__} evicts the same number of entries in every row and does not support "
                    "padded batches; run prompts one at a time or batch prompts of equal length"
                )
            if not same_rows:
                raise UnsupportedInputError(
                    f"{type(self).__name__} needs the vision tokens at the same positions in every row; "
                    "batch prompts of the same shape, or run them one by one"
                )
            B, S = input_ids.shape
            start = self.observation_start(S, last_vis)
            evict = start is not None and 0 <= start < S
            self._state = _EvictState(
                phase="prefill" if evict else "off",
                seq_len=S,
                vision_tokens=n_vis,
                vision=vision,
                start=start if evict else S,
                group=self._group_size(B, S, S - start) if evict else 1,
                cache=cache,
            )
            if evict:
                self._state.obs[vision.device] = Observation.build(start, S, vision.device)
            else:
                L = adapter.num_layers
                self._last_prefill = EvictionRecord(S, n_vis, L, [S] * L, [float(n_vis)] * L)
            return None
        if self._new_visual_input(kwargs, input_ids):
            raise UnsupportedInputError(
                "image tokens arrived after the prefill (chunked prefill splitting an image, or a new image "
                "in a later turn); compress one complete prompt per prefill"
            )
        if st.phase in ("prefill", "decode") and cache is not None and cache is st.cache:
            st.phase = "decode"
            st.masks = {}
            return None
        if st.phase == "decode" and cache is not st.cache:
            raise UnsupportedInputError(
                "decoding with a cache that this press did not fill; run the prefill inside the same "
                "`with press(model):` block"
            )
        st.phase = "off"
        return None

    def _new_visual_input(self, kwargs: dict, input_ids: torch.Tensor | None) -> bool:
        """Whether a forward after the prefill brings vision tokens. A decode step (one new token, no pixels)
        is not checked, so it reads nothing from the device; longer continuations are."""
        if any(kwargs.get(k) is not None for k in _VISUAL_KWARGS):
            return True
        if input_ids is None or input_ids.shape[-1] <= 1:
            return False
        return bool(self._adapter.vision_mask(input_ids).any())

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
        st = self._state
        obs = st.obs.get(device)
        if obs is None:  # a layer on another device (a model split over devices)
            obs = st.obs[device] = Observation.build(st.start, st.seq_len, device)
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
                with torch.profiler.record_function("lightkv::evict_stats"):
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
            chunks = observation_attention(q, k, self._observation(keys.device), scale)
            st.stats.append(self.layer_statistics(chunks, keys.shape[1]))
            st.done += R
            i = j

    def _top_post_hook(self, module, args, kwargs, output):
        st = self._state
        if st.phase != "prefill":
            return None
        with torch.profiler.record_function("lightkv::evict"):
            self._evict(st)
        st.phase = "decode"
        return None

    def _evict(self, st: _EvictState) -> None:
        L = self._adapter.num_layers
        if st.done != L or st.cache is None:
            raise RuntimeError(f"internal error: statistics of {st.done} of {L} layers were gathered")
        plan = self.plan(st.stats, st.seq_len, st.vision_tokens)
        st.stats, st.queries, st.rope = [], None, {}
        budgets, recent = plan.budgets, plan.recent
        # every layer's kept indices, on the device, in groups of layers of bounded memory
        picked, vis = [], []
        vis_ext = torch.cat([st.vision, st.vision.new_zeros(1)]).float()  # (S + 1,): the sentinel S is not vision
        l0 = 0
        for run in plan.scores:
            for a, b in _chunks(run.shape[0], 40 * run[0].numel()):
                g0, g1 = l0 + a, l0 + b
                scores = run[a:b] if b - a < run.shape[0] else run
                k = budgets[g0:g1] if isinstance(budgets, torch.Tensor) else _int_or_tensor(budgets[g0:g1], scores)
                r = recent if isinstance(recent, int) else recent[g0:g1]
                idx = select_kept(scores, k, r)
                ext = vis_ext if vis_ext.device == idx.device else vis_ext.to(idx.device)
                vis.append(ext[idx].sum(-1).mean(dim=(1, 2)).to(vis_ext.device))
                picked.extend(idx.unbind(0))
            l0 += run.shape[0]
        # the one host read of the end of prefill: the budgets that size the caches, and the details
        budgets, details = _read_host(budgets, plan.details)
        if len(budgets) != L or len(picked) != L:
            raise RuntimeError(f"internal error: budgets of {len(budgets)} and indices of {len(picked)} of {L} layers")
        kept = []
        for i, (idx, k) in enumerate(zip(picked, budgets)):
            layer = st.cache.layers[i]
            keys, values = layer.keys, layer.values
            idx = idx[..., :k]
            kept.append(idx if idx.device == st.vision.device else idx.to(st.vision.device))
            if k == keys.shape[-2]:  # keeps everything: the cache as it is
                continue
            if idx.device != keys.device:
                idx = idx.to(keys.device)
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            layer.keys = keys.gather(2, gather)
            if values.shape[-1] != keys.shape[-1]:
                gather = idx.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1])
            layer.values = values.gather(2, gather)
        self._last_prefill = EvictionRecord(
            seq_len=st.seq_len,
            vision_tokens=st.vision_tokens,
            num_layers=L,
            budgets=budgets,
            layer_vision_tokens=torch.cat(vis) if len(vis) > 1 else vis[0],
            kept_index=torch.cat(kept, dim=-1),  # (B, H_kv, Σ k_l): one tensor, split when read
            details=details,
        )

    def _decode_pre_hook(self, layer: int):
        layer_type = self._layer_types[layer]

        def hook(module, args, kwargs):
            st = self._state
            if st.phase != "decode":
                return None
            if kwargs.get("attention_mask") is None:
                # The model's attention needs no mask (SDPA, one new token, no padding): neither does this
                # layer, whatever its cached length.
                return None
            cache = cache_from_kwargs(kwargs)
            if cache is None:
                return None
            key = (layer_type, cache.get_seq_length(layer))
            mask = st.masks.get(key)
            if mask is None:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                ones = torch.ones(hidden.shape[0], key[1] + hidden.shape[1], dtype=torch.long, device=hidden.device)
                mask = st.masks[key] = causal_mask(self._adapter.text_config, layer_type, hidden, ones, cache, layer)
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook


def _chunks(n: int, bytes_each: int) -> Iterator[tuple[int, int]]:
    """``[a, b)`` ranges covering ``range(n)`` of at most ``MAX_CHUNK_BYTES // bytes_each`` items (at least one)."""
    step = max(1, attention.MAX_CHUNK_BYTES // max(1, bytes_each))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _int_or_tensor(values: Sequence[int], like: torch.Tensor) -> torch.Tensor | int:
    """Host ints for a group of layers: one int when all are equal, else a ``(G,)`` long tensor on ``like``'s device."""
    values = [int(v) for v in values]
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=torch.long, device=like.device)


def _read_host(budgets: torch.Tensor | Sequence[int], details: dict) -> tuple[list[int], dict]:
    """Budgets as ints and the details' tensors as lists, in one device → host read (none when nothing is a tensor)."""
    tensors = {k: v for k, v in details.items() if isinstance(v, torch.Tensor)}
    parts = ([budgets] if isinstance(budgets, torch.Tensor) else []) + list(tensors.values())
    if not parts:
        return [int(b) for b in budgets], dict(details)
    device = parts[0].device
    with torch.profiler.record_function("lightkv::host_read"):
        flat = torch.cat([p.reshape(-1).to(device=device, dtype=torch.float64) for p in parts]).tolist()
    out = dict(details)
    i = 0
    if isinstance(budgets, torch.Tensor):
        n = budgets.numel()
        budgets, i = [int(b) for b in flat[:n]], n
    else:
        budgets = [int(b) for b in budgets]
    for key, t in tensors.items():
        out[key] = flat[i : i + t.numel()]
        i += t.numel()
    return budgets, out
