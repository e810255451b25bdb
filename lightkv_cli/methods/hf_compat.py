"""What the methods need from transformers that changes between its versions, in one place.

- The keyword a cache is handed over with: ``past_key_values`` (transformers ≤ 5.23, deprecated in
  5.24 and gone in 5.40) or ``cache`` (≥ 5.24): :func:`cache_kwarg` to pass one, :func:`cache_from_kwargs`
  to read the one a forward (or a forward hook) received.
- The causal mask of a decoder layer for a given 2-D padding mask: :func:`causal_mask`, built with
  ``transformers.masking_utils`` (full or sliding-window attention), never by hand.
- Which caches a method that shortens or cuts the cache can work with: :func:`check_dynamic_cache`.

For transformers 5.x (the tests run the tiny LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL models with it).
Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

from lightkv_cli.errors import UnsupportedInputError

if TYPE_CHECKING:
    import torch


def cache_from_kwargs(kwargs: dict) -> Any:
    """The KV cache a forward (or a forward hook) was given, or None.

    Reads ``past_key_values`` (transformers ≤ 5.23, and what callers pass), else ``cache``, the name
    transformers ≥ 5.24 passes to decoder layers.
    """
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache


def output_cache(out) -> Any:
    """The KV cache a model's forward returned: its output's ``cache`` (transformers ≥ 5.24, where
    ``past_key_values`` is a deprecated alias) or ``past_key_values`` (earlier); None when it has none."""
    return out["cache"] if "cache" in out else out.get("past_key_values")


@functools.cache
def _cache_param(fn) -> str:
    """``"cache"`` when ``fn``'s signature takes ``cache``, else ``"past_key_values"`` (read once per function)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(fn, cache) -> dict:
    """The keyword argument that hands ``cache`` to ``fn`` (a model's ``forward`` or a transformers function).

    Returns:
        ``{"cache": cache}`` where ``fn`` takes ``cache`` (transformers ≥ 5.24, where
        ``past_key_values`` is deprecated and goes away in 5.40), else ``{"past_key_values": cache}``.
        The signature is read once per function (bound methods are looked up by their function).
    """
    return {_cache_param(getattr(fn, "__func__", fn)): cache}


@functools.cache
def _takes(fn, name: str) -> bool:
    """Whether ``fn``'s signature has a parameter ``name`` (read once per function and name)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def causal_mask(
    config, layer_type: str, hidden: torch.Tensor, mask_2d: torch.Tensor, cache, layer: int, *, allow_skip: bool = True
):
    """The attention mask a decoder layer of ``layer_type`` needs for ``hidden`` given a 2-D padding mask.

    Built with ``transformers.masking_utils.create_causal_mask`` (or
    ``create_sliding_window_causal_mask`` for ``layer_type == "sliding_attention"``), so it has the form
    the model's attention implementation expects.

    Args:
        config: the text (decoder) config.
        layer_type: ``"full_attention"`` or ``"sliding_attention"`` (``config.layer_types[layer]``).
        hidden: ``(B, q, D)`` hidden states the layer is about to process.
        mask_2d: ``(B, past + q)`` 1 for real tokens, 0 for padding, over what the layer attends to (its
            own cached length plus ``q``).
        cache: the ``DynamicCache`` (the layer's cached length decides the key positions).
        layer: index of the layer.
        allow_skip: False when ``mask_2d`` is known to hold zeros (e.g. eviction's filler slots): the mask is
            then built without transformers' check whether it could be skipped (``allow_is_causal_skip``),
            which reads the device (``padding_mask.sum() == numel``) and would answer no anyway. Versions
            whose mask functions lack that parameter make the check (correct, one host read more).

    Returns:
        What the attention implementation takes (a 4-D mask, or None: with SDPA and no padding the
        kernel's own causal masking is used, which is correct).

    ``position_ids`` is deliberately not passed: gapped ids (surviving tokens keep their positions) would
    make transformers build a packed-sequence (block-diagonal) mask.
    """
    from transformers import masking_utils

    fn = masking_utils.create_causal_mask
    if layer_type == "sliding_attention":
        fn = masking_utils.create_sliding_window_causal_mask
    extra = {} if allow_skip or not _takes(fn, "allow_is_causal_skip") else {"allow_is_causal_skip": False}
    return fn(
        config=config,
        inputs_embeds=hidden,
        attention_mask=mask_2d,
        **cache_kwarg(fn, cache),
        position_ids=None,
        layer_idx=layer,
        **extra,
    )


def check_dynamic_cache(cache) -> None:
    """Refuse caches whose layers are preallocated to one length (``StaticCache`` and the like).

    A method that shortens some layers' caches saves memory only with ``DynamicCache`` layers
    (``DynamicLayer``, ``DynamicSlidingWindowLayer``), which grow independently. A cache without
    ``layers`` (an older or custom cache) passes.

    Raises:
        UnsupportedInputError: a layer of another type (the message names it and says to use the default
            ``DynamicCache``).
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    for layer in layers:
        if type(layer).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            raise UnsupportedInputError(
                f"{type(cache).__name__} with {type(layer).__name__} layers preallocates every layer to the "
                "same length, so shortening the sequence saves no memory and is not supported; use the "
                "default DynamicCache"
            )


#: Forward arguments that carry pixels or ready-made visual features.
VISUAL_KWARGS = ("pixel_values", "pixel_values_videos", "image_embeds", "video_embeds")


def refuse_embeds_without_ids(press: object, kwargs: dict) -> None:
    """Refuse a prefill given ``inputs_embeds`` without ``input_ids``: a press finds the vision tokens by
    their ids.

    Raises:
        UnsupportedInputError: ``inputs_embeds`` given (the message names the press and the fix).
    """
    if kwargs.get("inputs_embeds") is not None:
        raise UnsupportedInputError(
            f"{type(press).__name__} needs input_ids to find the vision tokens; "
            "generate(inputs_embeds=...) without input_ids is not supported: pass input_ids"
        )


def refuse_vision_after_prefill(adapter, kwargs: dict, input_ids) -> None:
    """Refuse a forward after the prefill that brings vision input (pixels, or image ids in a continuation
    of several tokens). A decode step (one new token, no pixels) is not checked, so it reads nothing from
    the device.

    Raises:
        UnsupportedInputError: vision input after the prefill (chunked prefill splitting an image, or a new
            image in a later turn).
    """
    found = any(kwargs.get(k) is not None for k in VISUAL_KWARGS)
    if not found and input_ids is not None and input_ids.shape[-1] > 1:
        found = bool(adapter.vision_mask(input_ids).any())
    if found:
        raise UnsupportedInputError(
            "image tokens arrived after the prefill (chunked prefill splitting an image, or a new image "
            "in a later turn); compress one complete prompt per prefill"
        )
