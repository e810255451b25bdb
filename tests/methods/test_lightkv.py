"""LightKV on the tiny LLaVA model: identity at ratio 0, cached decode vs. an uncached reference,
cache contents vs. the schedule, guidance vs. brute force, batches, several images, clear errors."""

from __future__ import annotations

import pytest
import torch

from lightkv_cli import LightKV
from lightkv_cli.errors import UnsupportedInputError, UserError
from lightkv_cli.methods.hf_compat import cache_kwarg, output_cache
from lightkv_cli.runtime import cache_stats

QUESTION = "Describe this image in one sentence."
SCHEDULE = dict(layers=[3, 6, 9], windows=[4, 2, 1], ratios=[0.5, 0.5, 0.5])


def _generate(model, inputs, n=10, press=None):
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        if press is None:
            return model.generate(**inputs, **kwargs)
        with press(model):
            return model.generate(**inputs, **kwargs)


def test_ratio_zero_is_bit_identical(tiny, images, encode):
    model = tiny.model
    inputs = encode(images[:1], [QUESTION])
    press = LightKV(**{**SCHEDULE, "ratios": [0.0, 0.0, 0.0]})
    with torch.no_grad():
        ref_prefill = model(**inputs).logits
        with press(model):
            got_prefill = model(**inputs).logits
    assert torch.equal(ref_prefill, got_prefill)
    ref = _generate(model, inputs)
    got = _generate(model, inputs, press=press)
    assert len(ref.logits) == len(got.logits) == 10
    for a, b in zip(ref.logits, got.logits):
        assert torch.equal(a, b)
    assert torch.equal(ref.sequences, got.sequences)
    assert press.last_prefill.vision_retention == 1.0


@pytest.mark.parametrize("guidance", ["cross", "prompt", "uniform"])
@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_cached_decode_equals_uncached_reference(tiny, images, encode, guidance, positions):
    """Every decode step equals a full uncached forward over prompt + generated tokens, compressed
    the same way (the recorded guidance is replayed so the merges are the same)."""
    model = tiny.model
    inputs = encode(images[:1], [QUESTION])
    press = LightKV(**SCHEDULE, guidance=guidance, positions=positions)
    out = _generate(model, inputs, press=press)
    rec = press.last_prefill
    assert rec.vision_retention < 0.7
    fixed = press.with_fixed_guidance([s.guidance for s in rec.stages])
    S = inputs["input_ids"].shape[1]
    for t, step_logits in enumerate(out.logits):
        ids = out.sequences[:, : S + t]
        with torch.no_grad(), fixed(model):
            full = model(
                input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids), use_cache=False
            )
        assert (full.logits[:, -1] - step_logits).abs().max().item() <= 1e-4, f"step {t}"


def test_positions_modes_differ(tiny, images, encode):
    """renumber really changes positions (so the reference test above is not vacuous for it)."""
    inputs = encode(images[:1], [QUESTION])
    keep = _generate(tiny.model, inputs, n=1, press=LightKV(**SCHEDULE, guidance="uniform"))
    ren = _generate(tiny.model, inputs, n=1, press=LightKV(**SCHEDULE, guidance="uniform", positions="renumber"))
    assert not torch.equal(keep.logits[0], ren.logits[0])


@pytest.mark.parametrize(
    "schedule",
    [
        SCHEDULE,
        dict(layers=[1, 8, 14], windows=[6, 3, 1], ratios=[0.3, 0.5, 0.25]),
        dict(layers=[5], windows=[2], ratios=[0.1]),
        dict(layers=[2, 4, 6, 8], windows=[4, 2, 1, 1], ratios=[0.5, 0.5, 0.5, 0.5]),
    ],
)
def test_cache_holds_what_the_schedule_predicts(tiny, images, encode, schedule):
    model = tiny.model
    inputs = encode(images[:1], [QUESTION])
    press = LightKV(**schedule)
    predicted = press.predict(model)  # vision tokens per layer for one image
    with torch.no_grad(), press(model):
        out = model(**inputs, use_cache=True)
    S = inputs["input_ids"].shape[1]
    n_vis = tiny.adapter.vision_tokens_per_image()
    stats = cache_stats(output_cache(out), n_vis)
    assert stats.layer_seq_lens[0] == S  # layer 0 is never shortened
    assert stats.layer_vision_tokens == predicted
    assert press.last_prefill.layer_seq_lens == stats.layer_seq_lens
    assert press.last_prefill.layer_vision_tokens == predicted
    # layers up to and including the first stage layer hold everything
    first = schedule["layers"][0]
    assert all(n == S for n in stats.layer_seq_lens[: first + 1])
    assert stats.vision_retention == pytest.approx(press.expected_retention, abs=1e-12)
    assert out.logits.shape[1] == stats.layer_seq_lens[-1]


def test_default_schedule_counts_are_exact(tiny, images, encode):
    """576 → 288 → 144 → 72 with windows 4-2-1 at ratio 0.5 (the published LLaVA schedule)."""
    press = LightKV(**SCHEDULE)
    counts = press.predict(tiny.model)
    assert sorted(set(counts), reverse=True) == [576, 288, 144, 72]
    L = tiny.adapter.num_layers
    assert press.expected_retention == pytest.approx((4 * 576 + 3 * 288 + 3 * 144 + 6 * 72) / (L * 576))


def test_vision_bytes_ratio_equals_measured_retention(tiny, images, encode):
    inputs = encode(images[:1], [QUESTION])
    n_vis = tiny.adapter.vision_tokens_per_image()
    with torch.no_grad():
        base = cache_stats(output_cache(tiny.model(**inputs, use_cache=True)), n_vis)
        press = LightKV(**SCHEDULE)
        with press(tiny.model):
            comp = cache_stats(output_cache(tiny.model(**inputs, use_cache=True)), n_vis)
    assert base.vision_retention == 1.0
    assert comp.vision_bytes / base.vision_bytes == pytest.approx(comp.vision_retention, abs=1e-12)
    text_bytes = base.total_bytes - base.vision_bytes
    assert comp.total_bytes - comp.vision_bytes == text_bytes  # text is never compressed
    cfg = tiny.adapter.text_config
    per_token_layer = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert comp.total_bytes == per_token_layer * sum(comp.layer_seq_lens)


def _brute_force_guidance(tiny, inputs, layer, mode):
    """Eager reference: full S×S logits from the layer's own projections, by the definitions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny.model
    lm = tiny.adapter.language_model
    captured = {}
    h = lm.layers[layer].register_forward_hook(
        lambda mod, args, kwargs, out: captured.update(
            x=kwargs.get("hidden_states", args[0] if args else None), pe=kwargs["position_embeddings"]
        ),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    x, (cos, sin) = captured["x"][0:1].double(), captured["pe"]
    attn = lm.layers[layer].self_attn
    ln = lm.layers[layer].input_layernorm
    with torch.no_grad():
        xn = ln(captured["x"][0:1]).double()
        H, d = tiny.adapter.text_config.num_attention_heads, attn.head_dim
        S = x.shape[1]
        q = torch.nn.functional.linear(xn, attn.q_proj.weight.double()).view(1, S, H, d).transpose(1, 2)
        k = torch.nn.functional.linear(xn, attn.k_proj.weight.double()).view(1, S, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos[0:1].double(), sin[0:1].double())
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        logits = (q @ k.transpose(-1, -2))[0] / d**0.5  # (H, S, S)
    vision = inputs["input_ids"][0] == tiny.adapter.image_token_id()
    if mode == "cross":
        g = torch.softmax(logits[:, :, ~vision], dim=1).sum(dim=(0, 2))
    else:
        last = torch.nonzero(vision).max()
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        g = p[:, last + 1 :, :].mean(dim=(0, 1))
    return g[vision].float()


@pytest.mark.parametrize("mode", ["cross", "prompt"])
def test_guidance_matches_brute_force(tiny, images, encode, mode):
    inputs = encode(images[:1], [QUESTION])
    press = LightKV(layers=[4], windows=[2], ratios=[0.5], guidance=mode)
    with torch.no_grad(), press(tiny.model):
        tiny.model(**inputs)
    got = press.last_prefill.stages[0].guidance[0]
    want = _brute_force_guidance(tiny, inputs, 4, mode)
    assert got.shape == want.shape == (576,)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert got.std() > 0  # real guidance, not constant


def test_left_padded_batch_equals_single_runs(tiny, images, encode):
    questions = [QUESTION, "Is there a spoon on the saucer? Answer yes or no."]
    batch = encode(images, questions)
    assert (batch["attention_mask"] == 0).any()  # really padded
    press = LightKV(**SCHEDULE)
    out = _generate(tiny.model, batch, n=6, press=press)
    for i in range(2):
        single = encode(images[i : i + 1], questions[i : i + 1])
        ref = _generate(tiny.model, single, n=6, press=LightKV(**SCHEDULE))
        for a, b in zip(out.logits, ref.logits):
            assert (a[i] - b[0]).abs().max().item() <= 1e-4
        assert torch.equal(out.sequences[i, -6:], ref.sequences[0, -6:])


def test_two_images_are_windowed_separately(tiny, images, encode):
    inputs = encode(images, ["Compare the two images."], num_images_per_prompt=2)
    ids = inputs["input_ids"][0]
    vis = torch.nonzero(ids == tiny.adapter.image_token_id()).flatten()
    assert vis.numel() == 1152
    first, second = set(vis[:576].tolist()), set(vis[576:].tolist())
    press = LightKV(layers=[2, 5], windows=[2, 1], ratios=[0.5, 0.5])
    with torch.no_grad(), press(tiny.model):
        tiny.model(**inputs)
    rec = press.last_prefill
    assert [s.vision_out for s in rec.stages] == [576, 288]  # each image: 576 → 288 → 144
    for stage in rec.stages:
        pairs = stage.merge_pairs[0]
        assert pairs.shape[0] > 0
        for a, b in pairs.tolist():
            assert (a in first and b in first) or (a in second and b in second)
        # each image loses exactly half of its tokens at every stage
        lost_first = sum(1 for a, _ in pairs.tolist() if a in first)
        assert lost_first == pairs.shape[0] // 2


def test_merge_pairs_stay_inside_windows(tiny, images, encode):
    inputs = encode(images[:1], [QUESTION])
    press = LightKV(layers=[3], windows=[4], ratios=[0.5])
    with torch.no_grad(), press(tiny.model):
        tiny.model(**inputs)
    vis = torch.nonzero(inputs["input_ids"][0] == tiny.adapter.image_token_id()).flatten().tolist()
    where = {p: divmod(i, 24) for i, p in enumerate(vis)}
    pairs = press.last_prefill.stages[0].merge_pairs[0].tolist()
    assert len(pairs) == 288  # 16 windows of 36 tokens, 18 merges each
    for a, b in pairs:
        (ra, ca), (rb, cb) = where[a], where[b]
        assert (ra // 6, ca // 6) == (rb // 6, cb // 6)


def test_for_retention_targets(tiny, images, encode):
    for target in (0.9, 0.75, 0.55, 0.4):
        press = LightKV.for_retention(target, tiny.model)
        assert abs(press.expected_retention - target) < 0.02, (target, press.schedule_note)
        assert press.schedule_note
        inputs = encode(images[:1], [QUESTION])
        with torch.no_grad(), press(tiny.model):
            tiny.model(**inputs)
        assert press.last_prefill.vision_retention == pytest.approx(press.expected_retention, abs=1e-12)
    assert LightKV.for_retention(1.0, tiny.model).expected_retention == 1.0
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(UserError):
            LightKV.for_retention(bad, tiny.model)
    with pytest.raises(UserError, match="below the lowest"):
        LightKV.for_retention(0.01, tiny.model)


def test_invalid_schedules_raise():
    with pytest.raises(UserError):
        LightKV(layers=[3, 2], windows=[1, 1], ratios=[0.5, 0.5])
    with pytest.raises(UserError):
        LightKV(layers=[3], windows=[1, 2], ratios=[0.5])
    with pytest.raises(UserError):
        LightKV(layers=[3], windows=[0], ratios=[0.5])
    with pytest.raises(UserError):
        LightKV(layers=[3], windows=[1], ratios=[1.5])
    with pytest.raises(UserError):
        LightKV(layers=[3], windows=[1], ratios=[0.5], guidance="random")


def test_stage_after_last_layer_is_rejected(tiny):
    press = LightKV(layers=[15], windows=[1], ratios=[0.5])
    with pytest.raises(UserError, match="decoder layers"), press(tiny.model):
        pass


def test_hooks_removed_on_exit_and_on_error(tiny, images, encode):
    model = tiny.model
    layers = tiny.adapter.layers

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = n_hooks()
    press = LightKV(**SCHEDULE)
    with press(model):
        assert n_hooks() > before
    assert n_hooks() == before
    with pytest.raises(RuntimeError, match="boom"), press(model):
        raise RuntimeError("boom")
    assert n_hooks() == before
    assert len(layers[4]._forward_pre_hooks) == 0


def _hooks(modules) -> list[tuple[int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]


def _added(modules, before, kind: int | None = None) -> list[int]:
    """Indices of ``modules`` with more hooks (``kind`` 0: pre-hooks, 1: forward hooks, None: either)."""
    kinds = (0, 1) if kind is None else (kind,)
    return [i for i, (n, b) in enumerate(zip(_hooks(modules), before)) if any(n[k] > b[k] for k in kinds)]


def _hook_baseline(tiny, inputs):
    """``(modules, layers, their hook counts)`` after a warm forward (transformers attaches its own
    output-recording hooks at a model's first forward)."""
    everything, layers = list(tiny.model.modules()), list(tiny.adapter.layers)
    with torch.no_grad():
        tiny.model(**inputs)
    return everything, layers, _hooks(everything), _hooks(layers)


def _decode_step(model, inputs, out) -> None:
    """One greedy decode step on ``out``'s cache (no grad)."""
    nxt = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
    with torch.no_grad():
        model(input_ids=nxt, attention_mask=mask, use_cache=True, **cache_kwarg(model.forward, output_cache(out)))


@pytest.mark.parametrize("ratio", [0.5, 1e-9])
def test_decode_runs_hooks_only_where_the_sequence_shrank(tiny, images, encode, ratio):
    """Prefill hooks leave at the first decode step; compressed layers' pre-hooks exist only after a cut."""
    model = tiny.model
    inputs = encode(images[:1], [QUESTION])
    everything, layers, before_all, before_layers = _hook_baseline(tiny, inputs)
    press = LightKV(layers=[3, 6, 9], windows=[4, 2, 1], ratios=[ratio] * 3)
    shrunk = list(range(4, 16)) if ratio == 0.5 else []  # ratio 1e-9 merges nothing
    with torch.no_grad(), press(model):
        assert _added(everything, before_all) == [0]  # the top-level pre-hook only, until a prefill starts
        out = model(**inputs, use_cache=True)
        assert _added(layers, before_layers, kind=1) == [3, 6, 9]  # the stages
        assert _added(layers, before_layers, kind=0) == shrunk
        _decode_step(model, inputs, out)
        assert _added(layers, before_layers) == shrunk
        assert len(_added(everything, before_all)) == 1 + len(shrunk)  # stage and q/k capture hooks gone
    assert _hooks(everything) == before_all


def test_rows_with_different_vision_counts_raise(tiny, images, encode):
    one = encode(images[:1], [QUESTION])
    two = encode(images, ["Compare."], num_images_per_prompt=2)
    S = two["input_ids"].shape[1]
    pad = tiny.processor.tokenizer.pad_token_id
    ids1 = torch.nn.functional.pad(one["input_ids"], (S - one["input_ids"].shape[1], 0), value=pad)
    mask1 = torch.nn.functional.pad(one["attention_mask"], (S - one["input_ids"].shape[1], 0), value=0)
    ids = torch.cat([ids1, two["input_ids"]])
    mask = torch.cat([mask1, two["attention_mask"]])
    pixels = torch.cat([one["pixel_values"], two["pixel_values"]])
    with pytest.raises(UnsupportedInputError, match="different vision-token counts"):
        with torch.no_grad(), LightKV(**SCHEDULE)(tiny.model):
            tiny.model(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def test_inputs_embeds_without_input_ids_raise(tiny, images, encode):
    inputs = encode(images[:1], [QUESTION])
    embeds = tiny.model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(UnsupportedInputError, match="input_ids"), torch.no_grad(), LightKV(**SCHEDULE)(tiny.model):
        tiny.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_chunked_prefill_splitting_an_image_raises(tiny, images, encode):
    from transformers import DynamicCache

    inputs = encode(images[:1], [QUESTION])
    ids = inputs["input_ids"]
    vis = torch.nonzero(ids[0] == tiny.adapter.image_token_id()).flatten()
    cut = int(vis[300])  # inside the image
    with pytest.raises(UnsupportedInputError, match="chunked prefill"):
        with torch.no_grad(), LightKV(**SCHEDULE)(tiny.model):
            cache = DynamicCache(config=tiny.adapter.text_config)
            tiny.model(
                input_ids=ids[:, :cut], pixel_values=inputs["pixel_values"], **cache_kwarg(tiny.model.forward, cache)
            )


def test_static_cache_is_refused(tiny, images, encode):
    from transformers import StaticCache

    inputs = encode(images[:1], [QUESTION])
    cache = StaticCache(config=tiny.adapter.text_config, max_cache_len=inputs["input_ids"].shape[1] + 4)
    with pytest.raises(UnsupportedInputError, match="saves no memory"):
        with torch.no_grad(), LightKV(**SCHEDULE)(tiny.model):
            tiny.model(**inputs, **cache_kwarg(tiny.model.forward, cache))


def test_text_only_prompt_is_untouched(tiny):
    tok = tiny.processor.tokenizer
    ids = tok("USER: hello there ASSISTANT:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = tiny.model(input_ids=ids).logits
        press = LightKV(**SCHEDULE)
        with press(tiny.model):
            got = tiny.model(input_ids=ids).logits
    assert torch.equal(ref, got)
    assert press.last_prefill.vision_tokens == 0


@pytest.mark.parametrize("num_layers", [4, 5, 8])
def test_for_retention_on_shallow_models(tiny, num_layers):
    import copy

    from transformers import LlavaForConditionalGeneration

    config = copy.deepcopy(tiny.model.config)
    config.text_config.num_hidden_layers = num_layers
    model = LlavaForConditionalGeneration(config)
    if num_layers < 5:
        with pytest.raises(UserError, match="at least 5"):
            LightKV.for_retention(0.6, model)
        return
    assert LightKV.for_retention(1.0, model).expected_retention == 1.0
    press = LightKV.for_retention(0.6, model)
    assert max(press.layers) <= num_layers - 2
    assert abs(press.expected_retention - 0.6) < 0.05
    with pytest.raises(UserError, match="below the lowest"):
        LightKV.for_retention(0.05, model)


@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_multi_token_decode_step_equals_reference(tiny, images, encode, positions):
    """A decode forward with several new tokens at once (e.g. a follow-up turn) stays causal."""
    inputs = encode(images[:1], [QUESTION])
    press = LightKV(**SCHEDULE, guidance="uniform", positions=positions)
    new = tiny.processor.tokenizer(" and more", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([inputs["input_ids"], new], dim=1)
    with torch.no_grad(), press(tiny.model):
        out = tiny.model(**inputs, use_cache=True)
        step = tiny.model(
            input_ids=new, attention_mask=torch.ones_like(ids), **cache_kwarg(tiny.model.forward, output_cache(out))
        )
        full = tiny.model(
            input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids), use_cache=False
        )
    k = new.shape[1]
    assert k >= 3
    assert (step.logits - full.logits[:, -k:]).abs().max().item() <= 1e-4


def test_eager_attention_gives_the_same_result_as_sdpa(tiny, images, encode):
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(
        tiny.source, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    inputs = encode(images[:1], [QUESTION])
    got_sdpa = _generate(tiny.model, inputs, n=4, press=LightKV(**SCHEDULE))
    got_eager = _generate(eager, inputs, n=4, press=LightKV(**SCHEDULE))
    for a, b in zip(got_sdpa.logits, got_eager.logits):
        assert (a - b).abs().max().item() <= 1e-4
    assert torch.equal(got_sdpa.sequences, got_eager.sequences)


def test_cls_token_of_full_feature_strategy_is_never_merged(tiny, images):
    import copy

    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    config = copy.deepcopy(tiny.model.config)
    config.vision_feature_select_strategy = "full"
    model = LlavaForConditionalGeneration(config).eval()
    proc = LlavaProcessor(
        image_processor=tiny.processor.image_processor,
        tokenizer=tiny.processor.tokenizer,
        patch_size=14,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
    )
    inputs = proc(images=images[:1], text=[tiny.adapter.format_prompt(QUESTION)], return_tensors="pt")
    vis = torch.nonzero(inputs["input_ids"][0] == config.image_token_id).flatten()
    assert vis.numel() == 577
    press = LightKV(layers=[2, 5], windows=[2, 1], ratios=[0.5, 0.5])
    predicted = press.predict(model)
    with torch.no_grad(), press(model):
        model(**{k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
    rec = press.last_prefill
    assert rec.layer_vision_tokens == predicted and predicted[-1] == 1 + 144
    cls = int(vis[0])
    for stage in rec.stages:
        assert cls not in stage.merge_pairs[0].flatten().tolist()
    assert all(cls in k[0].tolist() for k in rec.kept_index)
