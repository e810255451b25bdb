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


def test_cuda_devices_of_a_device_map():
    from types import SimpleNamespace

    from lightkv_cli.models.placement import cuda_devices

    model = SimpleNamespace(hf_device_map={"a": 1, "b": "cuda:0", "c": "cpu", "d": "disk", "e": 1, "f": "cuda"})
    assert cuda_devices(model) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert cuda_devices(SimpleNamespace()) == [] and cuda_devices(SimpleNamespace(hf_device_map={"a": "cpu"})) == []


def test_allocator_peak_per_device_with_a_fake_allocator(monkeypatch):
    """Every GPU of a split model is reset on enter and read on exit; the first stays ``peak_bytes``."""
    from lightkv_cli.measure.memory import PeakMemory

    peaks = {0: 5 << 20, 1: 7 << 20, 2: 3 << 20}
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: resets.append(torch.device(d).index))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: peaks[torch.device(d).index])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 << 20)
    others = [torch.device("cuda", 1), torch.device("cuda", 2), torch.device("cuda", 0), torch.device("cpu")]
    with PeakMemory("cuda:0", others) as peak:
        pass
    assert sorted(resets) == [0, 1, 2]
    assert peak.kind == "cuda_allocator" and peak.peak_bytes == 5 << 20
    assert peak.per_device == {"cuda:0": 5 << 20, "cuda:1": 7 << 20, "cuda:2": 3 << 20}
    with PeakMemory("cuda:0") as alone:
        pass
    assert alone.per_device == {} and alone.peak_bytes == 5 << 20
