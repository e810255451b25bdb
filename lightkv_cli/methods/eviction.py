"""Post-prefill KV eviction: the shared machinery of VL-Cache and SnapKV.

Prefill runs unchanged (same compute, same peak memory). While it runs, each decoder layer's
attention from a few *observation* queries to every prompt key is computed from the layer's own
post-RoPE queries and cached keys (:mod:`lightkv_cli.methods.attention`) — ``H·τ·S`` logits per
layer, never an ``S×S`` matrix, and the model keeps running SDPA / flash attention. When the
prefill forward returns, every layer's cache is cut to its budget, per key/value head (each head
keeps its own tokens, every head of a layer the same number, so the cache stays rectangular:
``(B, H_kv, k_l, d)``). Decoding attends to what is left.

Unlike the in-prefill methods (:class:`~lightkv_cli.methods.base.SequencePress`), eviction may
shorten layer 0 and drops text tokens as well as vision tokens; positions are unaffected (the cached
keys carry their rotary phase, and ``generate()`` and :func:`~lightkv_cli.runtime.greedy_generate`
derive decode positions from the 2-D attention mask, not from the cache length). Decoding layers get
an attention mask built from their own cached length.

Limits (clear errors): batches with padding (rows would need different budgets), ``StaticCache``,
chunked prefill, ``generate(inputs_embeds=...)`` without ``input_ids``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightkv_cli.errors import UnsupportedInputError, UserError
from lightkv_cli.methods.attention import attention_rows, rope_queries
from lightkv_cli.methods.base import Press
from lightkv_cli.methods.hf_compat import cache_from_kwargs, causal_mask, check_dynamic_cache
from lightkv_cli.methods.records import EvictionRecord
from lightkv_cli.models.adapters import FamilyAdapter


def keep_budget(alpha: float | None, match_retention: float | None, seq_len: int, vision_tokens: int) -> float:
    """The global keep fraction ``α`` of the prompt's KV entries.

    Either ``alpha`` is given, or ``match_retention = R``: then ``α = 1 − (1 − R)·n/S``, which keeps
    exactly as many KV entries as an in-prefill method that keeps a fraction ``R`` of the ``n`` vision
    tokens and all text (equal KV bytes, the comparison a sweep makes).

    Raises:
        ValueError: neither or both given.
    """
    if (alpha is None) == (match_retention is None):
        raise ValueError("give exactly one of budget and match_retention")
    if alpha is not None:
        return float(alpha)
    if seq_len == 0:
        return 1.0
    return 1.0 - (1.0 - float(match_retention)) * vision_tokens / seq_len


def select_per_head(scores: torch.Tensor, keep: int, recent: int) -> torch.Tensor:
    """Indices to keep per KV head: the ``recent`` last positions, then the highest scores.

    Args:
        scores: ``(B, H_kv, S)`` float32 importance of every prompt position.
        keep: entries kept per head, ``1 ≤ keep ≤ S``.
        recent: most recent positions always kept (capped at ``keep``).

    Returns:
        ``(B, H_kv, keep)`` long indices, ascending along the last axis. Ties go to the earlier position.
    """
    B, H, S = scores.shape
    keep = max(1, min(keep, S))
    recent = max(0, min(recent, keep))
    tail = torch.arange(S - recent, S, device=scores.device).expand(B, H, recent)
    rest = keep - recent
    if rest > 0:
        head = scores[..., : S - recent]
        # stable descending sort: equal scores keep the earlier position first
        pick = torch.sort(head, dim=-1, descending=True, stable=True).indices[..., :rest]
        idx = torch.cat([pick, tail], dim=-1)
    else:
        idx = tail
    return idx.sort(dim=-1).values


def group_mean(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, H, ...)`` per query head → ``(B, H_kv, ...)``: mean over each KV head's query group."""
    B, H = x.shape[:2]
    return x.view(B, kv_heads, H // kv_heads, *x.shape[2:]).mean(dim=2)


@dataclass
class _EvictState:
    phase: str = "off"  # "prefill" | "decode" | "off"
    seq_len: int = 0
    vision: torch.Tensor | None = None  # (S,) bool, vision positions (same in every row)
    qpos: torch.Tensor | None = None  # (τ,) observation query positions
    cache: Any = None
    captured: dict = field(default_factory=dict)  # layer -> q_proj output
    stats: dict = field(default_factory=dict)  # layer -> method statistics
    masks: dict = field(default_factory=dict)  # decode: layer -> mask of this forward


class EvictionPress(Press):
    """Base of post-prefill eviction methods (VL-Cache, SnapKV).

    Subclasses choose the observation queries (:meth:`observation`), reduce each layer's attention
    rows to statistics (:meth:`layer_statistics`), and decide per-layer budgets and kept indices
    (:meth:`plan`). The base captures queries, runs the statistics without an ``S×S`` matrix,
    evicts once prefill ends, records an :class:`EvictionRecord` in :attr:`last_prefill`, and gives
    decoding layers masks for their own cached length.
    """

    #: positions are never renumbered by eviction (kept for a uniform interface with SequencePress)
    positions: str = "keep"
    #: not predicted: which tokens go depends on the attention, and text is evicted too
    expected_retention: float | None = None
    schedule_note: str = ""

    # --- what a subclass provides ----------------------------------------------------------
    def observation(self, seq_len: int, vision: torch.Tensor) -> torch.Tensor | None:
        """``(τ,)`` long prompt positions whose attention is observed; None: do not evict this prompt."""
        raise NotImplementedError

    def layer_statistics(self, layer: int, chunks, kv_heads: int) -> Any:
        """Reduce a layer's observation attention (:func:`~lightkv_cli.methods.attention.attention_rows`
        chunks) to what :meth:`plan` needs."""
        raise NotImplementedError

    def plan(self, stats: list[Any], seq_len: int, vision_tokens: int) -> tuple[list[torch.Tensor], dict]:
        """Per layer ``(B, H_kv, k_l)`` long kept indices, ascending, and method details for the record."""
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
        handles = [
            model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True),
            model.register_forward_hook(self._top_post_hook, with_kwargs=True),
        ]
        for i, layer in enumerate(adapter.layers):
            handles.append(layer.self_attn.q_proj.register_forward_hook(self._capture_hook(i)))
            handles.append(layer.register_forward_hook(self._stats_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_pre_hook(self._decode_pre_hook(i), with_kwargs=True))
        return handles

    def _detach(self) -> None:
        self._state = _EvictState()

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
            if mask is not None and mask.ndim == 2 and not bool(mask.bool().all()):
                raise UnsupportedInputError(
                    f"{type(self).__name__} evicts the same number of entries in every row and does not support "
                    "padded batches; run prompts one at a time or batch prompts of equal length"
                )
            vis_rows = adapter.vision_mask(input_ids).cpu()  # (B, S); eviction needs no grid
            S = input_ids.shape[1]
            vision = vis_rows[0].clone()
            if bool((vis_rows != vision).any()):
                raise UnsupportedInputError(
                    f"{type(self).__name__} needs the vision tokens at the same positions in every row; "
                    "batch prompts of the same shape, or run them one by one"
                )
            qpos = self.observation(S, vision)
            self._state = _EvictState(
                phase="off" if qpos is None or qpos.numel() == 0 else "prefill",
                seq_len=S,
                vision=vision,
                qpos=qpos,
                cache=cache,
            )
            if self._state.phase == "off":
                n_vis = int(vision.sum())
                self._last_prefill = EvictionRecord(
                    S, n_vis, adapter.num_layers, [S] * adapter.num_layers, [float(n_vis)] * adapter.num_layers
                )
            return None
        if input_ids is not None and bool(adapter.vision_mask(input_ids).any()):
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

    def _capture_hook(self, layer: int):
        def hook(module, args, output):
            if self._state.phase == "prefill":
                self._state.captured[layer] = output

        return hook

    def _stats_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            st = self._state
            if st.phase != "prefill":
                return None
            with torch.profiler.record_function("lightkv::evict_stats"):
                cache = cache_from_kwargs(kwargs)
                if st.cache is None:
                    st.cache = cache
                if cache is None:
                    raise UnsupportedInputError(f"{type(self).__name__} needs a KV cache: run with use_cache=True")
                keys = cache.layers[layer].keys
                q_out = st.captured.pop(layer)
                attn = module.self_attn
                qpos = st.qpos.to(keys.device)
                q = rope_queries(self._adapter, layer, attn, q_out, qpos, kwargs["position_embeddings"])
                scale = float(getattr(attn, "scaling", q.shape[-1] ** -0.5))
                chunks = attention_rows(q, keys, qpos, scale)
                st.stats[layer] = self.layer_statistics(layer, chunks, keys.shape[1])
            return None

        return hook

    def _top_post_hook(self, module, args, kwargs, output):
        st = self._state
        if st.phase != "prefill":
            return None
        with torch.profiler.record_function("lightkv::evict"):
            self._evict(st)
        st.phase = "decode"
        return None

    def _evict(self, st: _EvictState) -> None:
        adapter = self._adapter
        L = adapter.num_layers
        if len(st.stats) != L or st.cache is None:
            raise RuntimeError(f"internal error: statistics of {len(st.stats)} of {L} layers were gathered")
        n_vis = int(st.vision.sum())
        kept, details = self.plan([st.stats[i] for i in range(L)], st.seq_len, n_vis)
        budgets, vis = [], []
        for i, idx in enumerate(kept):
            layer = st.cache.layers[i]
            k, v = layer.keys, layer.values
            idx = idx.to(k.device)
            gidx = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
            layer.keys = k.gather(2, gidx)
            layer.values = v.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
            budgets.append(int(idx.shape[-1]))
            vis.append(float(st.vision.to(idx.device)[idx].float().sum(-1).mean()))
        st.stats = {}
        self._last_prefill = EvictionRecord(
            seq_len=st.seq_len,
            vision_tokens=n_vis,
            num_layers=L,
            budgets=budgets,
            layer_vision_tokens=vis,
            kept_index=[i.cpu() for i in kept],
            details=details,
        )

    def _decode_pre_hook(self, layer: int):
        def hook(module, args, kwargs):
            st = self._state
            if st.phase != "decode":
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cache = cache_from_kwargs(kwargs)
            if cache is None:
                return None
            config = self._adapter.text_config
            types = getattr(config, "layer_types", None)
            layer_type = types[layer] if types else "full_attention"
            past = cache.get_seq_length(layer)
            key = (layer_type, past)
            if key not in st.masks:
                ones = torch.ones(hidden.shape[0], past + hidden.shape[1], dtype=torch.long, device=hidden.device)
                st.masks[key] = causal_mask(config, layer_type, hidden, ones, cache, layer)
            kwargs["attention_mask"] = st.masks[key]
            return args, kwargs

        return hook


def check_fraction(name: str, value: float | None) -> None:
    """Raise ``UserError`` unless ``value`` is in ``(0, 1]`` (None passes)."""
    if value is None:
        return
    if math.isnan(value) or not (0.0 < value <= 1.0):
        raise UserError(f"{name} must be in (0, 1], got {value}")


def avg_pool_1d(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pooling along the last axis, stride 1, same length (edges average what exists)."""
    if kernel <= 1 or x.shape[-1] == 0:
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return pooled[..., : shape[-1]].reshape(shape)
