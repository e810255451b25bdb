"""Hub conventions (issue 21 item 1), offline: a real HTTP server on 127.0.0.1 serves a tiny checkpoint the way
the Hugging Face Hub does (``HF_ENDPOINT`` points at it): download on first use into the Hugging Face cache,
cached reuse, offline refusal, gated (401) and missing (404) repositories, a missing revision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hub_server import FakeHub

from lightkv_cli.errors import UserError
from lightkv_cli.models.loader import load_model
from lightkv_cli.models.tiny import ensure_tiny_checkpoint

REPO = "lightkv-test/tiny-llava"


@pytest.fixture
def hub(monkeypatch, tmp_path, _isolated_cache):
    import huggingface_hub.constants

    folder = Path(ensure_tiny_checkpoint(name="tiny"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with FakeHub({REPO: folder}, gated=("lightkv-test/gated",)) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _weights_fetched(server) -> int:
    return sum(1 for cmd, path in server.requests if cmd == "GET" and path.endswith("model.safetensors"))


def test_download_on_first_use_then_reuse_the_cache(hub, tiny, monkeypatch):
    got = load_model(REPO, device="cpu", dtype="float32")
    assert got.source == REPO and _weights_fetched(hub) == 1
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(got.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)
    again = load_model(REPO, device="cpu", dtype="float32")  # online: asks for the revision, fetches nothing
    assert _weights_fetched(hub) == 1 and again.source == REPO
    n = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = load_model(REPO, device="cpu", dtype="float32")  # offline: from the cache, no request at all
    assert len(hub.requests) == n and offline.source == REPO


def test_offline_refuses_what_is_not_cached(hub):
    with pytest.raises(UserError, match="not in the local Hugging Face cache and downloads are off") as err:
        load_model(REPO, device="cpu", dtype="float32", offline=True)
    assert "\n" not in str(err.value) and hub.requests == []


@pytest.mark.parametrize(
    ("repo", "revision", "said"),
    [
        ("lightkv-test/gated", None, "gated repository"),
        ("lightkv-test/missing", None, "no Hub repository"),
        (REPO, "v9", "no such revision"),
    ],
)
def test_hub_errors_are_one_line(hub, repo, revision, said):
    with pytest.raises(UserError, match=said) as err:
        load_model(repo, device="cpu", dtype="float32", revision=revision)
    assert "\n" not in str(err.value)


def test_no_network_is_one_line(monkeypatch, tmp_path, _isolated_cache):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub") as err:
        load_model(REPO, device="cpu", dtype="float32")
    assert "\n" not in str(err.value)
