"""Post-prefill eviction (VL-Cache, SnapKV) on left-padded batches: every row as if alone.

For each tiny family, a left-padded batch of three prompts with different question lengths (so different
pad counts) and the same vision-token count: each row keeps exactly the prompt entries it keeps at batch
1 (after removing its pad offset), has the same per-layer budgets (``row_budgets``), and decodes the same
greedy tokens with the same logits (float32, ≤ 1e-5) as the row alone. Filler slots (rows with smaller
budgets than the layer's slot count) are −1 in ``kept_index`` and are never attended to.
"""

from __future__ import annotations

import pytest
import torch
from tiny_families import ALL_FAMILIES, SIZES, encode_rows, load

from lightkv_cli.methods.snapkv import SnapKV
from lightkv_cli.methods.vlcache import VLCache

QUESTIONS = ["What is shown?", "Describe this image in one sentence.", "Which colour is the largest object, and where?"]
STEPS = 4
TOL = 1e-5

PRESSES = {
    "vlcache": lambda: VLCache(budget=0.3),
    "snapkv": lambda: SnapKV(budget=0.3, window=8),
}


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def family(request, images):
    """A family's model and a same-size image per row (equal vision-token counts)."""
    name = request.param
    lm = request.getfixturevalue("tiny") if name == "tiny" else load(name)
    size = SIZES[name][0]
    imgs = [im if size is None else im.resize(size) for im in images]
    return name, lm, [imgs[i % 2] for i in range(len(QUESTIONS))]


def _generate(model, inputs, press):
    kwargs = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True)
    with torch.no_grad(), press(model):
        out = model.generate(**inputs, **kwargs, return_dict_in_generate=True)
    return out, press.last_prefill


@pytest.mark.parametrize("method", list(PRESSES))
def test_padded_rows_evict_and_decode_as_alone(family, method):
    name, lm, imgs = family
    batch = encode_rows(lm, imgs, QUESTIONS)
    mask = batch["attention_mask"]
    pads = (mask == 0).sum(1).tolist()
    assert len(set(pads)) == len(QUESTIONS)  # different pad counts, left padding
    assert bool((mask[:, -1] == 1).all())
    out, rec = _generate(lm.model, batch, PRESSES[method]())
    S = batch["input_ids"].shape[1]
    L = lm.adapter.num_layers
    assert len(rec.row_budgets) == len(QUESTIONS) and rec.row_seq_lens == [S - p for p in pads]
    assert rec.budgets == [max(col) for col in zip(*rec.row_budgets)]
    fillers = 0
    for b, (img, q) in enumerate(zip(imgs, QUESTIONS)):
        one = encode_rows(lm, [img], [q])
        S_b = one["input_ids"].shape[1]
        assert S_b == S - pads[b]
        ref, alone = _generate(lm.model, one, PRESSES[method]())
        assert alone.row_budgets == [alone.budgets]
        assert alone.row_layer_vision_tokens == [alone.layer_vision_tokens]
        assert rec.row_budgets[b] == alone.budgets, (name, method, b)
        assert rec.row_layer_vision_tokens[b] == pytest.approx(alone.layer_vision_tokens, abs=1e-6)
        for layer in range(L):
            K, k = rec.budgets[layer], rec.row_budgets[b][layer]
            idx = rec.kept_index[layer][b]  # (H_kv, K_l)
            assert bool((idx[:, : K - k] == -1).all())
            fillers += K - k
            assert torch.equal(idx[:, K - k :] - pads[b], alone.kept_index[layer][0]), (name, method, b, layer)
        assert torch.equal(out.sequences[b, S:], ref.sequences[0, S_b:]), (name, method, b)
        for t in range(STEPS):
            diff = (out.logits[t][b] - ref.logits[t][0]).abs().max().item()
            assert diff <= TOL, (name, method, b, t, diff)
    if method == "snapkv":
        assert fillers > 0  # rows of different lengths keep different counts: fillers were exercised


# ------------------------------------------------------------------------ in-prefill: per-row retention


def test_lightkv_per_image_retention_rows_equal_each_row_alone(tiny, encode, images):
    """LightKV, two images per prompt, a left-padded batch of three: row ``b``'s per-image retention is what
    row ``b`` alone records (``per_image_retention``), and row 0's is ``per_image_retention``."""
    from lightkv_cli import LightKV

    schedule = dict(layers=[3, 6, 9], windows=[4, 2, 1], ratios=[0.5, 0.3, 0.5])
    imgs = [images[i % 2] for i in range(2 * len(QUESTIONS))]
    batch = encode(imgs, QUESTIONS, num_images_per_prompt=2)
    assert len(set((batch["attention_mask"] == 0).sum(1).tolist())) == len(QUESTIONS)
    press = LightKV(**schedule)
    with torch.no_grad(), press(tiny.model):
        tiny.model(**batch)
    rec = press.last_prefill
    rows = rec.per_image_retention_rows
    assert len(rows) == len(QUESTIONS) and rows[0] == rec.per_image_retention
    assert rec.input_tokens_rows[0] == rec.input_tokens
    assert all(len(r) == 2 for r in rows)
    for b, q in enumerate(QUESTIONS):
        alone = LightKV(**schedule)
        with torch.no_grad(), alone(tiny.model):
            tiny.model(**encode(imgs[2 * b : 2 * b + 2], [q], num_images_per_prompt=2))
        assert rows[b] == alone.last_prefill.per_image_retention, b
        assert rec.input_tokens_rows[b] == alone.last_prefill.input_tokens
    assert all(0 < x < 1 for r in rows for x in r)  # every image was compressed


def test_right_padding_is_refused(tiny, images):
    from lightkv_cli.errors import UnsupportedInputError

    tok = tiny.processor.tokenizer
    side, tok.padding_side = tok.padding_side, "right"
    try:
        texts = [tiny.adapter.format_prompt(q) for q in QUESTIONS[:2]]
        enc = tiny.processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    assert not bool(inputs["attention_mask"][:, -1].all())
    for press in (VLCache(budget=0.3), SnapKV(budget=0.3)):
        with torch.no_grad(), press(tiny.model), pytest.raises(UnsupportedInputError, match="left-padded"):
            tiny.model(**inputs)
