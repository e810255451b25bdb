"""The comparison methods (VL-Cache, SnapKV, FastV, RandomDrop) on the tiny LLaVA model: identity when
everything is kept, cached decode vs. an uncached reference with the same kept entries, kept counts vs.
each method's rule, VL-Cache budgets, and statistics vs. a brute-force eager computation."""

from __future__ import annotations

import math

import pytest
import torch
from test_lightkv import _generate
from tiny_families import evicted_prompt_masks

from lightkv_cli import LightKV
from lightkv_cli.errors import UnsupportedInputError, UserError
from lightkv_cli.methods.fastv import FastV
from lightkv_cli.methods.hf_compat import output_cache
from lightkv_cli.methods.merging import merges_per_window, window_ids
from lightkv_cli.methods.random_drop import RandomDrop
from lightkv_cli.methods.registry import KIND_DROP, KIND_EVICT, KIND_MERGE, KIND_PRE, METHODS, make_press
from lightkv_cli.methods.snapkv import SnapKV
from lightkv_cli.methods.vlcache import VLCache, layer_budgets
from lightkv_cli.runtime import cache_stats

QUESTION = "What is in this picture? Describe it please."
SCHEDULE = dict(layers=[3, 6, 9], windows=[4, 2, 1], ratios=[0.5, 0.5, 0.5])


@pytest.fixture(scope="module")
def eager(tiny):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(
        tiny.source, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def one(encode, images):
    return encode(images[:1], [QUESTION])


@pytest.fixture(scope="module")
def attentions(eager, one):
    """Brute force: every layer's full ``(1, H, S, S)`` attention matrix from the eager model."""
    with torch.no_grad():
        return [a.float() for a in eager(**one, output_attentions=True).attentions]


def _vision_mask(tiny, ids):
    return ids[0] == tiny.adapter.image_token_id()


def _assert_same_top(brute: torch.Tensor, kept: torch.Tensor, k: int, tol: float = 1e-5):
    """``kept`` (k indices) is the top-k of ``brute`` scores up to ties within ``tol``."""
    top = set(torch.topk(brute, k).indices.tolist())
    got = set(kept.tolist())
    assert len(got) == k
    kth = torch.topk(brute, k).values[-1].item()
    for j in got ^ top:  # only near-ties at the boundary may differ
        assert abs(brute[j].item() - kth) <= tol, (j, brute[j].item(), kth)


# ------------------------------------------------------------------------------------------------ registry


#: The methods lightkv ships, with their press classes. A new registry entry needs no edit here: the
#: methods x families matrix (test_matrix.py) covers it from the registry alone.
SHIPPED = {
    "lightkv": "LightKV",
    "lightkv-prompt": "LightKV",
    "lightkv-uniform": "LightKV",
    "vlcache": "VLCache",
    "fastv": "FastV",
    "snapkv": "SnapKV",
    "random": "RandomDrop",
}


def test_registry_names_and_kinds():
    assert [m for m in METHODS if m in SHIPPED] == list(SHIPPED)  # all shipped, in this order
    assert {m.kind for m in METHODS.values()} <= {KIND_MERGE, KIND_DROP, KIND_PRE, KIND_EVICT}
    shipped = [METHODS[m] for m in SHIPPED]
    assert {m.name for m in shipped if m.kind == KIND_EVICT} == {"vlcache", "snapkv"}
    assert {m.name for m in shipped if m.schedules} == {"lightkv", "lightkv-prompt", "lightkv-uniform", "random"}


def test_make_press_types_and_schedule_refusal(tiny):
    from lightkv_cli.methods.schedule import Schedule

    kinds = {m: type(make_press(m, tiny.model, target=0.55)).__name__ for m in METHODS}
    assert {m: kinds[m] for m in SHIPPED} == SHIPPED
    with pytest.raises(UserError, match="does not take a LightKV schedule"):
        make_press("vlcache", tiny.model, schedule=Schedule.build([3, 6, 9], [4, 2, 1], [0.5]))


# ------------------------------------------------------------------------------------ keep everything


@pytest.mark.parametrize(
    "press",
    [
        RandomDrop(**{**SCHEDULE, "ratios": [0.0, 0.0, 0.0]}),
        FastV(layer=2, ratio=0.0),
        VLCache(budget=1.0),
        SnapKV(budget=1.0),
    ],
    ids=["random", "fastv", "vlcache", "snapkv"],
)
def test_keep_everything_is_bit_identical(tiny, one, press):
    model = tiny.model
    with torch.no_grad():
        ref_prefill = model(**one).logits
        with press(model):
            got_prefill = model(**one).logits
    assert torch.equal(ref_prefill, got_prefill)
    ref = _generate(model, one, n=6)
    got = _generate(model, one, n=6, press=press)
    for a, b in zip(ref.logits, got.logits):
        assert torch.equal(a, b)
    assert torch.equal(ref.sequences, got.sequences)
    assert press.last_prefill.vision_retention == 1.0


# --------------------------------------------------------------------- decode vs. uncached reference


def _evicted_reference(eager, ids, pixel_values, kept, S):
    """Uncached forward over ``ids`` where tokens after the prompt see, per head, only the kept prompt entries."""
    cfg = eager.config.text_config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    T = ids.shape[1]
    with evicted_prompt_masks(eager.model.language_model.layers, kept, H, Hkv, S, T), torch.no_grad():
        return eager(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits


@pytest.mark.parametrize("press", [VLCache(budget=0.3), SnapKV(budget=0.3, window=8)], ids=["vlcache", "snapkv"])
def test_eviction_decode_equals_uncached_reference(tiny, eager, one, press):
    out = _generate(tiny.model, one, n=6, press=press)
    rec = press.last_prefill
    S = one["input_ids"].shape[1]
    assert rec.kv_retention < 0.32
    full = _evicted_reference(eager, out.sequences[:, : S + 5], one["pixel_values"], rec.kept_index, S)
    for t, step_logits in enumerate(out.logits):
        assert (full[:, S - 1 + t] - step_logits).abs().max().item() <= 1e-4, f"step {t}"
    # and eviction changed something: the full-cache model decodes differently
    ref = _generate(tiny.model, one, n=6)
    assert max((a - b).abs().max().item() for a, b in zip(ref.logits[1:], out.logits[1:])) > 1e-3


def test_fastv_decode_equals_uncached_reference(tiny, one):
    press = FastV(layer=2, ratio=0.5)
    out = _generate(tiny.model, one, n=6, press=press)
    fixed = press.with_fixed_scores(press.last_prefill.stages[0].guidance)
    S = one["input_ids"].shape[1]
    for t, step_logits in enumerate(out.logits):
        ids = out.sequences[:, : S + t]
        with torch.no_grad(), fixed(tiny.model):
            full = tiny.model(
                input_ids=ids, pixel_values=one["pixel_values"], attention_mask=torch.ones_like(ids), use_cache=False
            )
        assert (full.logits[:, -1] - step_logits).abs().max().item() <= 1e-4, f"step {t}"


def test_random_decode_equals_uncached_reference(tiny, one):
    press = RandomDrop(**SCHEDULE, seed=3)
    out = _generate(tiny.model, one, n=6, press=press)
    S = one["input_ids"].shape[1]
    for t, step_logits in enumerate(out.logits):
        ids = out.sequences[:, : S + t]
        with torch.no_grad(), press(tiny.model):  # same seed: the same tokens are dropped
            full = tiny.model(
                input_ids=ids, pixel_values=one["pixel_values"], attention_mask=torch.ones_like(ids), use_cache=False
            )
        assert (full.logits[:, -1] - step_logits).abs().max().item() <= 1e-4, f"step {t}"


# ---------------------------------------------------------------------------------- kept counts


def test_vlcache_budgets_hand_checked():
    assert layer_budgets([0.1, 0.2, 0.3, 0.4], 0.25, 100) == ([10, 20, 30, 40], [0.1, 0.2, 0.3, 0.4])
    # layer 0 would need 2·S: clipped to S, the rest re-apportioned so the total stays α·L·S = 200
    budgets, _ = layer_budgets([1.0, 0.0, 0.0, 0.0], 0.5, 100)
    assert budgets[0] == 100 and sum(budgets) == 200 and sorted(budgets[1:]) == [33, 33, 34]
    # the floor: at least ⌈0.01·S⌉ (≥ 1) tokens per layer
    assert layer_budgets([0.9, 0.5, 0.2, 0.05], 0.01, 37)[0] == [1, 1, 1, 1]


@pytest.mark.parametrize("seed", range(5))
def test_vlcache_budgets_sum_exactly_and_follow_density(seed):
    g = torch.Generator().manual_seed(seed)
    L, S = 32, int(torch.randint(50, 3000, (1,), generator=g))
    density = torch.rand(L, generator=g).tolist()
    alpha = float(torch.rand(1, generator=g)) * 0.9 + 0.05
    budgets, _betas = layer_budgets(density, alpha, S)
    assert sum(budgets) == round(alpha * L * S)
    assert all(max(1, math.ceil(0.01 * S)) <= k <= S for k in budgets)
    order = sorted(range(L), key=lambda i: density[i])
    for a, b in zip(order, order[1:]):  # denser layers never get fewer tokens (±1 from rounding)
        assert budgets[b] >= budgets[a] - 1


def test_vlcache_kept_counts_and_recent_window(tiny, one):
    press = VLCache(budget=0.3)
    with torch.no_grad(), press(tiny.model):
        out = tiny.model(**one, use_cache=True)
    rec = press.last_prefill
    S, L = one["input_ids"].shape[1], tiny.adapter.num_layers
    assert rec.budgets == layer_budgets(rec.details["density"], 0.3, S)[0]
    assert sum(rec.budgets) == round(0.3 * L * S)
    assert len(set(rec.budgets)) > 1  # per-layer budgets differ with density
    for layer, k, idx in zip(output_cache(out).layers, rec.budgets, rec.kept_index):
        assert layer.keys.shape[-2] == layer.values.shape[-2] == k
        assert tuple(idx.shape) == (1, tiny.adapter.text_config.num_key_value_heads, k)
        recent = math.floor(0.1 * k)
        assert bool((idx[..., k - recent :] == torch.arange(S - recent, S)).all())
    stats = cache_stats(output_cache(out), tiny.adapter.vision_tokens_per_image(), rec)
    assert stats.layer_seq_lens == rec.budgets and stats.processed_seq_lens == [S] * L
    assert abs(stats.vision_retention - rec.vision_retention) < 1e-12


def test_vlcache_statistics_match_brute_force(tiny, one, attentions):
    press = VLCache(budget=0.3)
    with torch.no_grad(), press(tiny.model):
        tiny.model(**one, use_cache=True)
    rec = press.last_prefill
    ids = one["input_ids"]
    S = ids.shape[1]
    last_vis = int(torch.nonzero(_vision_mask(tiny, ids)).max())
    Hkv = tiny.adapter.text_config.num_key_value_heads
    for layer, A in enumerate(attentions):
        post = A[0, :, last_vis + 1 :]  # (H, τ, S), rows of the post-vision queries
        tau = post.shape[1]
        visible = torch.ones(tau, S, dtype=torch.bool).tril(diagonal=last_vis + 1)
        zeroed = (post < 0.01 * post.amax(-1, keepdim=True)) & visible
        gamma = (zeroed.sum(-1).float() / visible.sum(-1).float()).mean().item()
        assert abs(rec.details["density"][layer] - (1 - gamma)) < 1e-4, layer
        scores = post.sum(1).view(Hkv, -1, S).mean(1)  # (H_kv, S)
        k = rec.budgets[layer]
        recent = math.floor(0.1 * k)
        for h in range(Hkv):
            kept = rec.kept_index[layer][0, h]
            assert bool((kept[k - recent :] == torch.arange(S - recent, S)).all())
            _assert_same_top(scores[h, : S - recent], kept[: k - recent], k - recent)


def test_snapkv_counts_and_statistics_match_brute_force(tiny, one, attentions):
    import torch.nn.functional as F

    press = SnapKV(budget=0.3, window=8, kernel=5)
    with torch.no_grad(), press(tiny.model):
        out = tiny.model(**one, use_cache=True)
    rec = press.last_prefill
    S = one["input_ids"].shape[1]
    k = round(0.3 * S)
    assert rec.budgets == [k] * tiny.adapter.num_layers
    Hkv = tiny.adapter.text_config.num_key_value_heads
    for layer, A in enumerate(attentions):
        assert output_cache(out).layers[layer].keys.shape[-2] == k
        mean = A[0, :, S - 8 :].mean(1).view(Hkv, -1, S).mean(1)  # (H_kv, S)
        prefix = F.avg_pool1d(mean[:, None, : S - 8], 5, stride=1, padding=2, count_include_pad=False)[:, 0]
        for h in range(Hkv):
            kept = rec.kept_index[layer][0, h]
            assert bool((kept[-8:] == torch.arange(S - 8, S)).all())  # the window is always kept
            _assert_same_top(prefix[h], kept[:-8], k - 8)


def test_fastv_counts_and_scores_match_brute_force(tiny, one, attentions):
    press = FastV(layer=2, ratio=0.5)
    with torch.no_grad(), press(tiny.model):
        out = tiny.model(**one, use_cache=True)
    S = one["input_ids"].shape[1]
    n = tiny.adapter.vision_tokens_per_image()
    L = tiny.adapter.num_layers
    lens = [layer.keys.shape[-2] for layer in output_cache(out).layers]
    assert lens == [S, S] + [S - n // 2] * (L - 2)
    assert press.predict(tiny.model) == [n, n] + [n - n // 2] * (L - 2)
    vis = torch.nonzero(_vision_mask(tiny, one["input_ids"])).flatten()
    brute = attentions[1][0, :, -1].mean(0)[vis]  # last token's attention at layer K-1 = 1, mean over heads
    rec = press.last_prefill
    kept_orig = rec.kept_index[0][0]
    kept_vis = torch.nonzero(torch.isin(vis, kept_orig)).flatten()
    _assert_same_top(brute, kept_vis, n - n // 2)
    assert torch.allclose(rec.stages[0].guidance[0], brute, atol=1e-6)


def test_fastv_for_retention(tiny):
    press = FastV.for_retention(0.55, tiny.model)
    assert abs(press.expected_retention - 0.55) < 0.01
    with pytest.raises(UserError, match="below the lowest FastV reaches"):
        FastV.for_retention(0.1, tiny.model)


def test_random_drop_counts_per_window_and_per_layer(tiny, one):
    press = RandomDrop(**SCHEDULE, seed=1)
    with torch.no_grad(), press(tiny.model):
        out = tiny.model(**one, use_cache=True)
    rec = press.last_prefill
    n = tiny.adapter.vision_tokens_per_image()
    assert rec.layer_vision_tokens == LightKV(**SCHEDULE).predict(tiny.model) == press.predict(tiny.model)
    S = one["input_ids"].shape[1]
    assert [layer.keys.shape[-2] for layer in output_cache(out).layers] == [S - n + c for c in rec.layer_vision_tokens]
    # stage 1: 4×4 windows of 6×6 tokens on the 24×24 grid, each loses exactly r_w = 18
    vis = torch.nonzero(_vision_mask(tiny, one["input_ids"])).flatten()
    survived = torch.isin(vis, rec.kept_index[0][0])
    coords = torch.stack([torch.arange(n) // 24, torch.arange(n) % 24], 1)
    wid = window_ids(coords, torch.zeros(n, dtype=torch.long), [(24, 24)], 4)
    dropped = torch.bincount(wid[~survived], minlength=16)
    assert dropped.tolist() == merges_per_window(torch.bincount(wid, minlength=16), 0.5).tolist() == [18] * 16
    # seeded: the same seed drops the same tokens, another seed others
    again = RandomDrop(**SCHEDULE, seed=1)
    other = RandomDrop(**SCHEDULE, seed=2)
    for p in (again, other):
        with torch.no_grad(), p(tiny.model):
            tiny.model(**one, use_cache=True)
    assert torch.equal(again.last_prefill.kept_index[0], rec.kept_index[0])
    assert not torch.equal(other.last_prefill.kept_index[0], rec.kept_index[0])


# --------------------------------------------------------------------------------------- limits


def test_vlcache_leaves_text_only_prompts_alone(tiny):
    ids = tiny.processor.tokenizer("USER: hello there ASSISTANT:", return_tensors="pt")["input_ids"]
    press = VLCache(budget=0.3)
    with torch.no_grad():
        ref = tiny.model(input_ids=ids).logits
        with press(tiny.model):
            out = tiny.model(input_ids=ids, use_cache=True)
    assert torch.equal(ref, out.logits)
    assert [layer.keys.shape[-2] for layer in output_cache(out).layers] == [ids.shape[1]] * tiny.adapter.num_layers


def test_matched_budget_keeps_as_many_entries_as_in_prefill(tiny, one):
    """At the same target, eviction keeps the KV entries LightKV's schedule would (equal KV bytes)."""
    S = one["input_ids"].shape[1]
    n = tiny.adapter.vision_tokens_per_image()
    L = tiny.adapter.num_layers
    for cls in (VLCache, SnapKV):
        press = cls(match_retention=0.55)
        with torch.no_grad(), press(tiny.model):
            tiny.model(**one, use_cache=True)
        alpha = 1 - 0.45 * n / S
        assert press.last_prefill.details["alpha"] == pytest.approx(alpha)
        assert abs(sum(press.last_prefill.budgets) - alpha * L * S) <= L


@pytest.mark.parametrize("bad", [dict(), dict(budget=0.5, match_retention=0.5), dict(budget=0.0), dict(budget=1.5)])
def test_eviction_parameters_are_validated(bad):
    for cls in (VLCache, SnapKV):
        with pytest.raises(UserError):
            cls(**bad)


@pytest.mark.parametrize("name", ["tiny-llava-next", "tiny-qwen2-vl"])
def test_every_method_runs_on_the_other_families(name, images):
    """Each method compresses LLaVA-NeXT and Qwen2-VL prompts to comparable KV bytes at one target
    (VisionZip, defined for LLaVA-1.5 only, refuses them)."""
    from lightkv_cli.models.loader import load_model
    from lightkv_cli.runtime import greedy_generate

    t = load_model(name, device="cpu", dtype="float32")
    enc = t.processor(images=images[0], text=t.adapter.format_prompt(QUESTION), return_tensors="pt")
    inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    n = int(t.adapter.vision_mask(inputs["input_ids"]).sum())
    ref = greedy_generate(t.model, inputs, n, 3, None)
    for method in METHODS:
        press = make_press(method, t.model, target=0.55)
        if method == "visionzip":
            with pytest.raises(UnsupportedInputError, match=r"LLaVA-1\.5 only"):
                greedy_generate(t.model, inputs, n, 3, None, press=press)
            continue
        got = greedy_generate(t.model, inputs, n, 3, None, press=press)
        ratio = got.cache.total_bytes / ref.cache.total_bytes
        assert 0.5 < ratio < 0.8, (method, ratio)
        assert got.cache.vision_retention < 0.85, method
