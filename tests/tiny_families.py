"""Helpers shared by the tests that run every tiny family (``tests/models/test_families.py``,
``tests/methods/test_matrix.py``): loading, image sizes whose grids nest under windows 4-2-1, inputs,
``generate()`` with logits, and the uncached inputs of prompt + generated tokens."""

from __future__ import annotations

import contextlib

import torch

#: Every tiny model the tests load (random weights, CPU): LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL.
ALL_FAMILIES = ["tiny", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl"]
QUESTION = "Describe this image in one sentence."
# Image sizes (width, height) whose grids nest under windows 4-2-1, so the schedule's prediction is exact.
# LLaVA-NeXT (112 px tiles): square → 2×2 tiles → 16×16 high-res grid; 2:1 → 1×2 tiles → 8×16.
# Qwen (28 px per token after the 2×2 merge): 336×224 → 8×12 tokens; 224×112 → 4×8.
# LLaVA-1.5 resizes every image to its 24×24 grid.
SIZES = {
    "tiny": [None, None],
    "tiny-llava-next": [(200, 200), (400, 200)],
    "tiny-qwen2-vl": [(336, 224), (224, 112)],
    "tiny-qwen2.5-vl": [(336, 224), (224, 112)],
}


def load(name: str):
    """The tiny model ``name`` as the CLI loads it (``LoadedModel``), on CPU in float32."""
    from lightkv_cli.models.loader import load_model

    torch.set_num_threads(2)
    return load_model(name, device="cpu", dtype="float32")


def sized(name: str, images: list) -> list:
    """The test images resized for family ``name`` (see :data:`SIZES`)."""
    return [im if size is None else im.resize(size) for im, size in zip(images, SIZES[name])]


def encode(lm, imgs, question=QUESTION, videos=None) -> dict:
    """Processor output (tensors only) for one prompt with ``imgs`` (and ``videos``)."""
    text = lm.adapter.format_prompt(question, num_images=len(imgs), num_videos=len(videos or []))
    kw = {"videos": videos} if videos else {}
    enc = lm.processor(images=imgs or None, text=[text], return_tensors="pt", **kw)
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def generate(model, inputs, n=4, press=None):
    """Greedy ``generate()`` of exactly ``n`` tokens with their logits, under ``press`` if given."""
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        if press is None:
            return model.generate(**inputs, **kwargs)
        with press(model):
            return model.generate(**inputs, **kwargs)


def full_inputs(inputs, ids) -> dict:
    """Uncached forward inputs for prompt + generated tokens (text tokens appended)."""
    extra = ids.shape[1] - inputs["input_ids"].shape[1]
    full = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    full["input_ids"] = ids
    full["attention_mask"] = torch.ones_like(ids)
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, extra))
    return full


@contextlib.contextmanager
def evicted_prompt_masks(layers, kept: list[torch.Tensor], num_heads: int, num_kv_heads: int, S: int, T: int):
    """Per-head attention masks on every decoder layer for an uncached reference of eviction: over a
    sequence of ``T`` tokens whose first ``S`` are the prompt, tokens after the prompt see, per KV head,
    only the prompt entries ``kept[layer]`` (``(1, num_kv_heads, k)`` indices); everything else is causal.
    Installed as forward pre-hooks for the duration of the block."""
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    handles = []
    for layer, idx in zip(layers, kept):
        allow = causal.expand(1, num_heads, T, T).clone()
        kp = torch.zeros(1, num_kv_heads, S, dtype=torch.bool).scatter_(2, idx, True)
        allow[:, :, S:, :S] = kp.repeat_interleave(num_heads // num_kv_heads, dim=1)[:, :, None, :]
        mask = torch.zeros(1, num_heads, T, T).masked_fill(~allow, torch.finfo(torch.float32).min)
        handles.append(
            layer.register_forward_pre_hook(
                lambda mod, a, kw, m=mask: (a, {**kw, "attention_mask": m}), with_kwargs=True
            )
        )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def encode_rows(lm, imgs, questions) -> dict:
    """Processor output (tensors only) for one left-padded row per question, row ``i`` with ``imgs[i]``."""
    tok = lm.processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        texts = [lm.adapter.format_prompt(q) for q in questions]
        enc = lm.processor(images=imgs, text=texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def capture_stages(press) -> list:
    """Wrap ``press.reduce`` to keep every stage's ``(input, output)``; returns the list it fills."""
    seen = []
    inner = press.reduce

    def reduce(inp):
        out = inner(inp)
        seen.append((inp, out))
        return out

    press.reduce = reduce
    return seen
