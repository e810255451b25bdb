"""The demo model's training pipeline, on pieces that need no easy-vqa download: canvas placement and
object cover, the shared-prefix training path against a plain forward of the processor's prompt,
training on a subset of vision tokens at their original positions, the answer weights and the
question-only baseline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lightkv_cli.demo_model import CHECKPOINT_DIR, TESTSET_DIR, TESTSET_PROMPTS, build, data, train


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT_DIR, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)
    return model, processor, train.Encoder(processor.tokenizer)


@pytest.fixture(scope="module")
def first_test_item():
    line = json.loads(TESTSET_PROMPTS.read_text().splitlines()[0])
    with Image.open(TESTSET_DIR / line["image"]) as im:
        image = im.convert("RGB")
    item = data.Item(0, str(TESTSET_DIR / line["image"]), [(line["question"], line["answer"])])
    return item, image


def _square_source(tmp_path, side=64, box=(16, 16, 48, 48)):
    """A 64×64 easy-VQA-like PNG: white background, one red square covering ``box``."""
    arr = np.full((side, side, 3), 255, dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = (255, 0, 0)
    path = tmp_path / "square.png"
    Image.fromarray(arr).save(path)
    return str(path)


def test_canvas_object_cover_is_exact_for_an_aligned_square(tmp_path):
    # Pasted at scale 1 at (8, 16): the square covers canvas pixels x 24..55, y 32..63 = patches
    # x 3..6, y 4..7, fully; nothing else.
    canvas = data.make_canvas(_square_source(tmp_path), 64, 8, 16)
    assert canvas.image.size == (data.CANVAS, data.CANVAS)
    frac = canvas.object_fraction
    assert frac.shape == (16, 16)
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[4:8, 3:7] = 1.0
    np.testing.assert_array_equal(frac, expected)
    assert canvas.image.getpixel((0, 0)) == (255, 255, 255)  # background tint fills the canvas
    assert canvas.image.getpixel((30, 40)) == (255, 0, 0)


def test_placement_is_deterministic_and_in_bounds():
    seen = set()
    for i in range(200):
        side, x, y = data.placement(0, "train", i, 3)
        assert (side, x, y) == data.placement(0, "train", i, 3)
        assert side == data.CANVAS or data.SCALE_RANGE[0] <= side <= data.SCALE_RANGE[1]
        assert 0 <= x <= data.CANVAS - side and 0 <= y <= data.CANVAS - side
        seen.add((side, x, y))
    assert len(seen) > 100  # placements vary between images
    variants = {data.placement(0, "train", 5, v) for v in range(20)}
    assert len(variants) > 10  # and between epochs (variants) of one image


def test_derived_attributes_from_questions():
    item = data.Item(
        0,
        "x",
        [
            ("what shape is in the image?", "circle"),
            ("is there a blue shape?", "no"),
            ("what color is the shape?", "teal"),
        ],
    )
    data._derive_attributes(item)
    assert (item.shape, item.colour) == ("circle", "teal")
    item = data.Item(
        1,
        "x",
        [
            ("is there not a rectangle?", "yes"),
            ("does the image contain a circle?", "no"),
            ("is there a red shape?", "yes"),
        ],
    )
    data._derive_attributes(item)
    assert (item.shape, item.colour) == ("triangle", "red")  # the only shape left


def test_training_keep_holds_every_object_token(tmp_path):
    canvas = data.make_canvas(_square_source(tmp_path), 64, 8, 16)  # 16 object tokens
    rng = np.random.default_rng(0)
    keep = train.training_keep([canvas, canvas], 40, rng)
    assert keep.shape == (2, 40)
    touched = set(np.nonzero(canvas.object_fraction.reshape(-1) > 0)[0].tolist())
    for row in keep.tolist():
        assert row == sorted(row) and len(set(row)) == 40
        assert touched <= set(row)
    small = train.training_keep([canvas], 10, rng)  # fewer slots than object tokens: a subset of them
    assert set(small[0].tolist()) <= touched and len(set(small[0].tolist())) == 10


def test_balanced_weights_equalise_the_answers_of_each_question():
    items = [
        data.Item(i, "x", [("is there a red shape?", "no" if i < 3 else "yes"), ("what shape?", "circle")])
        for i in range(4)
    ]
    w = train.balanced_weights(items)
    # 'no' seen 3×, 'yes' once: each answer's total weight is the same.
    assert 3 * w[("is there a red shape?", "no")] == pytest.approx(w[("is there a red shape?", "yes")])
    n = sum(len(it.questions) for it in items)
    total = sum(w[(q, a)] for it in items for q, a in it.questions)
    assert total == pytest.approx(n)  # mean weight 1
    base = train.question_only_baseline(items, items)
    assert base["overall"] == pytest.approx(7 / 8)  # the majority answer misses the one 'yes'


def test_shared_prefix_path_equals_a_plain_forward(demo, first_test_item):
    model, processor, enc = demo
    item, image = first_test_item
    canvas = data.Canvas(image, np.zeros((16, 16), np.float32), data.CANVAS, 0, 0)
    assert train.check_prefix_path(model, processor, enc, item, canvas, "cpu") < 1e-4


def _prefilled(demo, first_test_item):
    """``(suffix ids (1, T), vision features (1, 256, D), prefix cache, next position)`` of the first
    shipped test question."""
    model, _, enc = demo
    item, image = first_test_item
    suffix = torch.tensor([enc.suffix(item.questions[0][0])])
    feats = train.vision_features(model, train.pixels([image]))
    cache, start = train.prefix_cache(model, enc, feats)
    return suffix, feats, cache, start


def test_all_tokens_at_original_positions_equal_the_full_prefix(demo, first_test_item):
    model, _, enc = demo
    with torch.no_grad():
        suffix, feats, cache, start = _prefilled(demo, first_test_item)
        ref = train.suffix_logits(model, cache, torch.tensor([0]), suffix)
        keep = torch.arange(train.N_VISION).unsqueeze(0)
        cache2, start2 = train.prefix_cache(model, enc, feats, keep, keep_positions=True)
        got = train.suffix_logits(model, cache2, torch.tensor([0]), suffix, start2)
        assert start == start2 == train.N_HEAD + train.N_VISION
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        # Dropping tokens at their original positions is not the same as renumbering them.
        half = torch.arange(0, train.N_VISION, 2).unsqueeze(0)
        c_kept, s_kept = train.prefix_cache(model, enc, feats, half, keep_positions=True)
        c_ren, s_ren = train.prefix_cache(model, enc, feats, half)
        assert (s_kept, s_ren) == (train.N_HEAD + train.N_VISION, train.N_HEAD + train.N_VISION // 2)
        a = train.suffix_logits(model, c_kept, torch.tensor([0]), suffix, s_kept)
        b = train.suffix_logits(model, c_ren, torch.tensor([0]), suffix)
        assert not torch.allclose(a, b)


def test_prompt_text_matches_the_llava_adapter():
    from lightkv_cli.models.loader import load_model

    lm = load_model(device="cpu")
    assert lm.adapter.format_prompt("what color is the shape?") == build.prompt_text("what color is the shape?")


def test_contrast_questions_are_balanced_and_answered_from_the_labels():
    items = [
        data.Item(
            0,
            "x",
            [
                ("is there a red shape?", "yes"),
                ("is there not a circle?", "no"),
                ("does the image contain a blue shape?", "no"),
            ],
            shape="circle",
            colour="red",
        )
    ]
    templates = train.yes_no_templates(items)
    assert templates == [
        ("does the image contain a {} shape?", "colour", False),
        ("is there a {} shape?", "colour", False),
        ("is there not a {}?", "shape", True),
    ]
    qs = train.contrast_questions(items[0], templates, 40, np.random.default_rng(0))
    assert len(qs) == 40
    for j, (q, a) in enumerate(qs):
        own = ("red" in q.split()) or ("circle?" in q.split())
        assert own == (j % 2 == 0)  # every other question names the image's own colour or shape
        assert a == ("yes" if own != data.is_negated(q, a) else "no")
    assert (
        train.contrast_questions(
            data.Item(1, "x", [], shape=None, colour="red"), templates, 4, np.random.default_rng(0)
        )
        == []
    )


def test_match_targets_name_the_word_and_undo_the_negation(demo):
    _, _, enc = demo
    qa = [
        ("is there not a red shape?", "yes"),  # red is not the image's colour
        ("what color is the triangle?", "blue"),  # not a yes/no question: no target
        ("is there a circle?", "yes"),  # matches
        ("is no blue shape present?", "no"),  # blue is the image's colour
        ("does the image contain a rectangle?", "no"),
    ]
    seqs = [enc.suffix(q) + [enc.answer(a)] for q, a in qa]
    which, pos, target, negated = train.match_targets(enc, seqs, qa)
    assert which.tolist() == [0, 2, 3, 4]
    words = [enc.tok.convert_ids_to_tokens(seqs[r][p]) for r, p in zip(which.tolist(), pos.tolist())]
    assert words == ["red", "circle", "blue", "rectangle"]
    assert target.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert negated.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_background_change_counts_only_background_tokens():
    torch.manual_seed(0)
    empty = torch.randn(2, 256, 8)
    feats = empty.clone()
    background = torch.ones(2, 256, dtype=torch.bool)
    background[:, :10] = False
    assert float(train.background_change(feats, empty, background)) == 0.0
    feats[:, :10] += 5.0  # the object's own tokens may change freely
    assert float(train.background_change(feats, empty, background)) == 0.0
    feats[0, 20] = 0.0  # one background token loses everything: |f - f_e|² / |f_e|² = 1
    got = float(train.background_change(feats, empty, background))
    assert got == pytest.approx(1 / background.sum().item())


def test_suffix_logits_hidden_layers_are_the_decoder_layers_outputs(demo, first_test_item):
    model = demo[0]
    with torch.no_grad():
        suffix, _, cache, _ = _prefilled(demo, first_test_item)
        plain = train.suffix_logits(model, cache, torch.tensor([0]), suffix)
        logits, (h3, h12) = train.suffix_logits(model, cache, torch.tensor([0]), suffix, hidden_layers=(3, 12))
        torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
        # transformers returns the last layer's output after the final norm: what the LM head reads.
        torch.testing.assert_close(model.lm_head(h12), plain, atol=1e-5, rtol=0)
        assert h3.shape == (1, suffix.shape[1], model.config.text_config.hidden_size)
        assert not torch.allclose(h3, h12)
