"""Tests for lightkv_cli.telemetry: timers, spreads, peak memory, analytic FLOPs, environment."""

from __future__ import annotations

import gc
import json
import os
import sys
import time

import pytest
import torch
import transformers

from lightkv_cli.telemetry import (
    PeakMemory,
    Spread,
    Stopwatch,
    environment_info,
    kv_bytes_per_token,
    prefill_flops,
)


def _tiny_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=10,
    )


def test_spread_quartiles() -> None:
    s = Spread.of([4, 1, 3, 2])
    assert (s.median, s.p25, s.p75) == (2.5, 1.75, 3.25)
    assert (s.min, s.max, s.n) == (1.0, 4.0, 4)
    assert s.to_dict() == {"median": 2.5, "p25": 1.75, "p75": 3.25, "min": 1.0, "max": 4.0, "n": 4}


def test_spread_single_and_odd() -> None:
    one = Spread.of([7.0])
    assert (one.median, one.p25, one.p75, one.min, one.max, one.n) == (7.0, 7.0, 7.0, 7.0, 7.0, 1)
    odd = Spread.of([10, 0, 5, 20, 15])
    assert (odd.median, odd.p25, odd.p75) == (10.0, 5.0, 15.0)


def test_spread_empty_raises() -> None:
    with pytest.raises(ValueError):
        Spread.of([])


def test_stopwatch_measures_sleep() -> None:
    with Stopwatch() as sw:
        time.sleep(0.02)
    assert sw.ms is not None
    assert 19.0 <= sw.ms < 2000.0
    with Stopwatch("cpu") as quick:
        pass
    assert 0.0 <= quick.ms < sw.ms


def _touch(n_bytes: int) -> torch.Tensor:
    return torch.ones(n_bytes, dtype=torch.uint8)  # ones, not empty: the pages must be resident


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-run RSS peak reset is Linux-only")
def test_peak_memory_cpu_resets_per_run() -> None:
    gc.collect()
    with PeakMemory("cpu") as big:
        x = _touch(200_000_000)
    assert big.kind == "process_rss_peak"
    assert big.kind_label == "process RSS peak (CPU)"
    assert big.peak_bytes is not None and big.peak_bytes >= 200e6
    # The peak includes what was resident on entry; the growth must be the tensor.
    assert big.baseline_bytes is not None
    assert big.peak_bytes - big.baseline_bytes >= 0.95 * 200e6
    del x
    gc.collect()

    with PeakMemory(torch.device("cpu")) as small:
        y = _touch(10_000_000)
    del y
    assert small.kind == "process_rss_peak"
    # Without the reset the second peak would still include the freed 200 MB tensor.
    assert small.peak_bytes < big.peak_bytes - 100e6


def test_peak_memory_fallback_is_lifetime_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightkv_cli.telemetry as telemetry

    monkeypatch.setattr(telemetry, "_PROC_CLEAR_REFS", "/nonexistent/clear_refs")
    with PeakMemory() as pm:
        pass
    assert pm.kind == "process_rss_lifetime_peak"
    assert "not reset" in pm.kind_label
    assert pm.peak_bytes is not None and pm.peak_bytes > 10e6  # a Python process with torch loaded


def test_prefill_flops_hand_computed() -> None:
    # D=8, H=2, H_kv=1, d=4, I=16, vocab=10. Per layer with n tokens:
    #   projections 2n·8·8 + 4n·8·4 + 2n·8·8 = 384n; attention 4·2·4·n(n+1)/2 = 16n(n+1);
    #   MLP 6n·8·16 = 768n.  n=5: 1920+480+3840 = 6240.  n=3: 1152+192+2304 = 3648.
    #   LM head: 2·8·10 = 160.
    config = _tiny_config()
    assert prefill_flops(config, [5, 3]) == 6240 + 3648 + 160
    assert isinstance(prefill_flops(config, [5, 3]), int)
    assert prefill_flops(config, [5, 3], batch_size=3) == 3 * (6240 + 3648 + 160)


def test_prefill_flops_fewer_tokens_fewer_flops() -> None:
    config = _tiny_config()
    full = prefill_flops(config, [5, 5])
    assert prefill_flops(config, [5, 3]) < full
    assert prefill_flops(config, [3, 3]) < prefill_flops(config, [5, 3])


def test_prefill_flops_uses_explicit_head_dim() -> None:
    config = _tiny_config()
    config.head_dim = 8  # larger than hidden_size // heads = 4
    assert prefill_flops(config, [5, 3]) > prefill_flops(_tiny_config(), [5, 3])


@pytest.mark.parametrize("seq_lens", [[5], [5, 3, 1], []])
def test_prefill_flops_wrong_length_raises(seq_lens: list[int]) -> None:
    with pytest.raises(ValueError):
        prefill_flops(_tiny_config(), seq_lens)


def test_prefill_flops_bad_values_raise() -> None:
    with pytest.raises(ValueError):
        prefill_flops(_tiny_config(), [5, -1])
    with pytest.raises(ValueError):
        prefill_flops(_tiny_config(), [5, 3], batch_size=0)


def test_kv_bytes_per_token() -> None:
    config = _tiny_config()
    assert kv_bytes_per_token(config, torch.float16) == 2 * 1 * 4 * 2
    assert kv_bytes_per_token(config, torch.float32) == 32
    assert kv_bytes_per_token(config, torch.bfloat16) == 16


def test_environment_info_cpu() -> None:
    info = environment_info(torch.device("cpu"))
    assert info["cuda"] is False
    assert info["torch"] == torch.__version__
    assert info["transformers"] == transformers.__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["cpu_count"] == os.cpu_count()
    assert isinstance(info["device_name"], str) and info["device_name"]
    if os.path.exists("/proc/meminfo"):
        assert info["total_memory_bytes"] > 100e6
    json.dumps(info)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_paths() -> None:
    device = torch.device("cuda")
    with Stopwatch(device) as sw, PeakMemory(device) as pm:
        x = torch.ones(50_000_000, device=device)
    assert sw.ms > 0
    assert pm.kind == "cuda_allocator" and pm.kind_label == "GPU allocator peak"
    assert pm.peak_bytes >= 200e6
    del x
    info = environment_info(device)
    assert info["cuda"] is True and info["total_memory_bytes"] > 1e9
