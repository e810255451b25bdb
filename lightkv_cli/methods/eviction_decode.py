"""Decoding after post-prefill eviction: the attention masks of layers whose caches were cut.

A mixin of :class:`~lightkv_cli.methods.eviction.EvictionPress`. After eviction a layer holds ``K_l``
slots per head; a left-padded batch's row with fewer entries than ``K_l`` has leading *filler* slots that
decoding must not see, like left padding. Each decoding layer gets a mask built from its own cached
length, once per step and distinct ``(layer type, length, filler pattern)``, and none at all when the
model's attention needs none (SDPA, one new token, no padding, no fillers). Layers with fillers get masks
for all their row-budget patterns from one transformers call at the start of the first decode step
(:meth:`DecodeMasks._first_step_masks`), grown by one allowed key per later step (one ``cat`` instead of a
mask construction per layer and step). Nothing here reads the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightkv_cli.methods.hf_compat import cache_from_kwargs, causal_mask

if TYPE_CHECKING:
    from lightkv_cli.methods.eviction import _EvictState


class DecodeMasks:
    """Decode-time masks of an eviction press (expects ``self._state``, ``self._adapter``, ``self._layer_types``)."""

    def _first_step_masks(self, st: _EvictState) -> None:
        """The first decode step's masks (one new token per row) of the layers with filler slots, built when
        that step starts; later steps grow them (:meth:`_filler_mask`).

        One new token sees every key its row holds, so a full-attention layer's mask for that step is its
        2-D slot mask (0 at fillers) in the attention implementation's form. The masks of every distinct
        row-budget pattern are built by one transformers call, the patterns stacked as rows of one batch
        (right-aligned on the longest layer's keys, earlier keys masked), and cut per pattern along the key
        axis.
        """
        st.grown = {}
        cfg = self._adapter.text_config
        uniq: dict[tuple, int] = {}  # row budgets -> K_l, for full-attention layers
        for i, pattern in st.fill.items():
            if self._layer_types[i] != "sliding_attention":
                uniq.setdefault(pattern, st.cache.layers[i].keys.shape[-2])
        if not uniq:
            return
        full = [i for i in st.fill if self._layer_types[i] != "sliding_attention"]
        ref = max(full, key=lambda i: st.cache.layers[i].keys.shape[-2])
        keys = st.cache.layers[ref].keys
        if any(st.cache.layers[i].keys.device != keys.device for i in st.fill):
            return  # a model split over devices: built per layer at the first step
        B, K_max, dev = keys.shape[0], keys.shape[-2], keys.device
        patterns = list(uniq)
        # pattern u, row b: its k real slots end at the new token (column K_max), fillers and earlier keys before
        first = torch.tensor([[K_max - n for n in p] for p in patterns], dtype=torch.long, device=dev)
        mask_2d = (torch.arange(K_max + 1, device=dev) >= first.view(-1, 1)).long()  # (U·B, K_max + 1)
        hidden = keys.new_empty(mask_2d.shape[0], 1, cfg.hidden_size)
        mask = causal_mask(cfg, "full_attention", hidden, mask_2d, st.cache, ref, allow_skip=False)
        if not isinstance(mask, torch.Tensor) or mask.shape[0] != mask_2d.shape[0]:
            return  # a mask form that cannot be cut (e.g. flex attention): built per layer at the first step
        for u, p in enumerate(patterns):
            st.grown[("full_attention", p)] = (uniq[p] + 1, _view(mask, u * B, B, K_max - uniq[p]), 1)

    def _filler_mask(self, st: _EvictState, key: tuple, hidden: torch.Tensor, cache, layer: int):
        """The decode mask of a layer with filler slots: the one built at the start of the first decode
        step, grown by one allowed key per later step (one op instead of a mask construction per layer and
        step), or built with transformers (its 2-D mask: the layer's slots, 0 at the leading fillers, then
        the decoded tokens)."""
        layer_type, past, pattern = key
        B, q = hidden.shape[0], hidden.shape[1]
        grow_key = (layer_type, pattern)
        mask = _grown(st.grown.get(grow_key), past + q, q, layer_type)
        if mask is None:
            n = torch.tensor(pattern, dtype=torch.long, device=hidden.device).view(B, 1)
            K = st.slots[layer]
            prompt = (torch.arange(K, device=hidden.device) >= K - n).long()
            tail = _tail(st, B, past - K + q, hidden.device)
            mask_2d = torch.cat([prompt, tail], dim=1)
            mask = causal_mask(self._adapter.text_config, layer_type, hidden, mask_2d, cache, layer, allow_skip=False)
        st.grown[grow_key] = (past + q, mask, q)
        return mask

    def _decode_pre_hook(self, layer: int):
        layer_type = self._layer_types[layer]

        def hook(module, args, kwargs):
            st = self._state
            if st.phase != "decode":
                return None
            fill = st.fill.get(layer)
            if fill is None and kwargs.get("attention_mask") is None:
                # The model's attention needs no mask (SDPA, one new token, no padding) and this layer holds
                # no filler slots: neither does this layer, whatever its cached length.
                return None
            cache = cache_from_kwargs(kwargs)
            if cache is None:
                return None
            key = (layer_type, cache.get_seq_length(layer), fill)
            mask = st.masks.get(key)
            if mask is None:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                B, q = hidden.shape[0], hidden.shape[1]
                cfg = self._adapter.text_config
                if fill is None:
                    tail = _tail(st, B, None, hidden.device)
                    n = tail.shape[1] if tail is not None else 0
                    head = torch.ones(B, key[1] + q - n, dtype=torch.long, device=hidden.device)
                    mask_2d = head if tail is None else torch.cat([head, tail], dim=1)
                    mask = causal_mask(cfg, layer_type, hidden, mask_2d, cache, layer)
                else:
                    mask = self._filler_mask(st, key, hidden, cache, layer)
                st.masks[key] = mask
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook


def _grown(prev: tuple[int, Any, int] | None, kv: int, q: int, layer_type: str) -> torch.Tensor | None:
    """Last step's mask of a full-attention layer, one key longer: what this step's one new token sees (the
    last step's token saw every key it was allowed, and the new one sees itself). None unless that holds."""
    if prev is not None and prev[0] == kv and prev[2] == q:  # built for this step (at the end of prefill)
        return prev[1]
    if prev is None or q != 1 or layer_type == "sliding_attention" or prev[0] != kv - 1:
        return None
    mask = prev[1]
    if not isinstance(mask, torch.Tensor) or (mask.ndim == 4 and mask.shape[-2] != 1):
        return None
    return torch.cat([mask, _view(mask, 0, mask.shape[0], mask.shape[-1] - 1)], dim=-1)


def _view(mask: torch.Tensor, row: int, rows: int, key: int) -> torch.Tensor:
    """``mask[row : row + rows, ..., key:]`` as one ``as_strided`` view (a slice costs two ops per axis)."""
    size = (rows, *mask.shape[1:-1], mask.shape[-1] - key)
    offset = mask.storage_offset() + row * mask.stride(0) + key * mask.stride(-1)
    return mask.as_strided(size, mask.stride(), offset)


def _tail(st: _EvictState, rows: int, n: int | None, device) -> torch.Tensor | None:
    """The step's 2-D mask past the prompt (``st.tail``, ``(B, decoded + q)``), or ones of ``n`` columns
    when the step has none (``n`` None: None)."""
    if st.tail is not None:
        return st.tail.to(device=device, dtype=torch.long)
    return None if n is None else torch.ones(rows, n, dtype=torch.long, device=device)
