"""Model loading: the embedded tiny model, local checkpoints, --init random, offline errors."""

from __future__ import annotations

import pytest
import torch

from lightkv_cli.errors import UserError
from lightkv_cli.models import loader


def test_tiny_matches_the_promised_architecture(tiny):
    info = tiny.info()
    assert info["family"] == "llava"
    assert info["vision_tokens_per_image"] == 576 and info["image_grid"] == [24, 24]
    assert info["layers"] >= 8
    assert info["num_key_value_heads"] < info["num_attention_heads"]  # grouped-query attention
    assert info["weights_meaningful"] is False and tiny.notes
    assert tiny.dtype == torch.float32 and info["attn_implementation"] == "sdpa"


def test_tiny_build_is_deterministic(tiny, tmp_path):
    from lightkv_cli.models.tiny import ensure_tiny_checkpoint

    path = ensure_tiny_checkpoint(tmp_path)
    from transformers import LlavaForConditionalGeneration

    again = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(tiny.model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_local_checkpoint_directory_loads_offline(tiny, tmp_path):
    # "trained" weights: the tiny ones scaled, so they differ from any seed-0 random init
    trained = {k: v * 1.5 for k, v in tiny.model.state_dict().items()}
    tiny.model.save_pretrained(tmp_path / "ckpt", state_dict=trained)
    tiny.processor.save_pretrained(tmp_path / "ckpt")
    lm = loader.load_model(str(tmp_path / "ckpt"), device="cpu", dtype="float32")
    assert lm.init == "pretrained" and lm.weights_meaningful
    assert torch.equal(lm.model.lm_head.weight, trained["lm_head.weight"])
    rnd = loader.load_model(str(tmp_path / "ckpt"), init="random", device="cpu", dtype="float32")
    assert rnd.init == "random" and not rnd.weights_meaningful
    assert rnd.model.lm_head.weight.shape == tiny.model.lm_head.weight.shape
    assert not torch.equal(rnd.model.lm_head.weight, trained["lm_head.weight"])


def test_missing_weights_say_how_to_get_them(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(UserError) as exc:
        loader.load_model("llava", device="cpu")
    msg = str(exc.value)
    assert "llava-hf/llava-1.5-7b-hf" in msg and "hf download" in msg and "--init random" in msg


@pytest.mark.parametrize("name", ["no-such-model", "./", "a/b/c"])
def test_unknown_model_names(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError):
        loader.load_model(name, device="cpu")


def test_shipped_config_is_llava_1_5_7b(monkeypatch):
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    config = loader._load_config("llava-hf/llava-1.5-7b-hf", local=False)
    assert config.model_type == "llava"
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    assert 7.0e9 < params < 7.1e9
    tc = config.text_config
    assert (tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads, tc.hidden_size) == (32, 32, 32, 4096)
    assert config.vision_config.image_size // config.vision_config.patch_size == 24


def test_device_and_dtype_resolution():
    assert loader.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loader.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError):
        loader.resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(UserError):
        loader.resolve_device("tpu")
    if not torch.cuda.is_available():
        assert loader.resolve_device("auto").type == "cpu"
        with pytest.raises(UserError, match="no CUDA"):
            loader.resolve_device("cuda")
