"""Models placed by accelerate (issue 21 item 3), on CPU: part of a tiny model offloaded to disk, so
accelerate's own hooks run alongside the methods' hooks; the results equal the plain model's."""

from __future__ import annotations

import pytest
import torch

from lightkv_cli.methods.registry import make_press
from lightkv_cli.models.loader import load_model
from lightkv_cli.runtime import OWN, greedy_generate


@pytest.fixture(scope="module")
def offloaded(tiny):
    L = tiny.adapter.num_layers
    dm = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    dm.update({f"model.language_model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(L)})
    return load_model("tiny", device="cpu", dtype="float32", device_map=dm)


def test_the_model_is_really_offloaded(offloaded):
    assert "disk" in set(offloaded.model.hf_device_map.values())
    assert offloaded.device == torch.device("cpu") and any("accelerate" in n for n in offloaded.notes)


@pytest.mark.parametrize("method", ["lightkv", "vlcache", "fastv", "random"])
def test_offloaded_model_gives_the_plain_models_results(tiny, offloaded, encode, images, method):
    one = encode(images[:1], ["What is in the image?"])
    n = int(tiny.adapter.vision_mask(one["input_ids"])[0].sum())
    kw = dict(suppress_token_ids=tiny.adapter.vision_token_ids(), continuation=OWN)
    a = greedy_generate(tiny.model, one, n, 6, None, press=make_press(method, tiny.model, target=0.55), **kw)
    b = greedy_generate(offloaded.model, one, n, 6, None, press=make_press(method, offloaded.model, target=0.55), **kw)
    assert a.tokens == b.tokens
    assert torch.equal(a.first_logits, b.first_logits)
    assert a.cache.layer_bytes == b.cache.layer_bytes  # KV bytes summed the same way
    assert torch.equal(a.continuation_logits[0], b.continuation_logits[0])


def test_unknown_device_map_is_one_line_before_the_model_loads(runner, tmp_path, no_model_load):
    from cli_output import _assert_user_error

    from lightkv_cli.cli import app

    images = tmp_path / "imgs"
    images.mkdir()
    args = ["profile", "--model", "tiny", "--images", str(images), "--device-map", "everywhere"]
    _assert_user_error(runner.invoke(app, args), "--device-map must be one of", "auto", "everywhere")
    assert not no_model_load
