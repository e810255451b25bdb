"""Tests for lightkv_cli.measure (timers, peak memory, analytic FLOPs, environment, NVML) and scoring.stats spreads."""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import threading
import time
import types
from types import SimpleNamespace

import pytest
import torch
import transformers

from lightkv_cli.errors import UserError
from lightkv_cli.measure.costs import kv_bytes_per_token, max_concurrent_requests, prefill_flops
from lightkv_cli.measure.environment import environment_info
from lightkv_cli.measure.memory import PeakMemory, detect_memory_budget
from lightkv_cli.measure.nvml import NvmlSampler, _downsample, nvml_environment
from lightkv_cli.measure.timing import Stopwatch, profile_range
from lightkv_cli.scoring.stats import Spread
from lightkv_cli.units import parse_memory_size


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


def test_profile_range_records_only_while_a_profiler_runs() -> None:
    with profile_range("lightkv::test_off") as off:
        torch.ones(3).sum()
    assert off is None  # a no-op context: no profiler op dispatched
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with profile_range("lightkv::test_on"):
            torch.ones(3).sum()
    names = [e.name for e in prof.events()]
    assert names.count("lightkv::test_on") == 1
    assert "lightkv::test_off" not in names


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
    import lightkv_cli.measure.memory as memory

    monkeypatch.setattr(memory, "_PROC_CLEAR_REFS", "/nonexistent/clear_refs")
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


# --------------------------------------------------------------------------------------------
# NVML sampler
# --------------------------------------------------------------------------------------------

_CPU_NOTE = "NVML not sampled: the model runs on CPU"
_THREAD_NAME = "lightkv-nvml-sampler"


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == _THREAD_NAME]


class _FakeNvml(types.ModuleType):
    """A stand-in ``pynvml`` (methods named as pynvml's functions): memory readings come from ``used``; after the
    list, ``then`` (or raise).

    ``reached`` is set once ``wait_for`` memory readings were served, so a test can wait for
    the sampler thread to have run instead of sleeping.
    """

    def __init__(self, used: list[int], then: int | None, utilization: int | None = 37, wait_for: int = 6):
        super().__init__("pynvml")
        self.used = list(used)
        self.then = then
        self.utilization = utilization
        self.wait_for = wait_for
        self.served = 0
        self.reached = threading.Event()
        self.failed = threading.Event()
        self.init_calls = 0
        self.shutdown_calls = 0
        self.pci_calls: list[str] = []
        self.index_calls: list[int] = []

    def nvmlInit(self) -> None:
        self.init_calls += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: str) -> str:
        self.pci_calls.append(bus_id)
        return f"pci:{bus_id}"

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.index_calls.append(index)
        return f"index:{index}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        if self.served < len(self.used):
            value = self.used[self.served]
        elif self.then is None:
            self.failed.set()
            raise RuntimeError("GPU is lost")
        else:
            value = self.then
        self.served += 1
        if self.served >= self.wait_for:
            self.reached.set()
        return SimpleNamespace(used=value, total=80 * 2**30, free=80 * 2**30 - value)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        if self.utilization is None:
            raise RuntimeError("Not Supported")
        return SimpleNamespace(gpu=self.utilization, memory=5)

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA H100 80GB HBM3"  # old pynvml releases return bytes

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"


@pytest.fixture
def no_device_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch cannot describe the GPU (as on this CPU machine): the sampler must fall back to the index."""

    def boom(device: object) -> None:
        raise RuntimeError("no CUDA GPUs are available")

    monkeypatch.setattr(torch.cuda, "get_device_properties", boom)


def _install(monkeypatch: pytest.MonkeyPatch, fake: types.ModuleType | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), None])
def test_nvml_sampler_cpu_is_a_note_and_never_imports_pynvml(monkeypatch: pytest.MonkeyPatch, device) -> None:
    _install(monkeypatch, None)  # `import pynvml` would raise ImportError
    with NvmlSampler(device) as nvml:
        pass
    assert nvml.available is False
    assert nvml.note == _CPU_NOTE
    assert nvml.samples == []
    assert nvml.to_dict() == {"available": False, "note": _CPU_NOTE}
    assert nvml_environment(device) == {"available": False, "note": _CPU_NOTE, "device_name": None, "driver": None}


def test_nvml_init_failure_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    pynvml = pytest.importorskip("pynvml")
    shutdowns: list[int] = []

    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: shutdowns.append(1))
    note = "NVML not available: Driver Not Loaded"
    with NvmlSampler(torch.device("cuda")) as nvml:
        x = 1 + 1
    assert x == 2
    assert (nvml.available, nvml.note, nvml.samples) == (False, note, [])
    assert nvml.to_dict() == {"available": False, "note": note}
    assert nvml_environment("cuda:0") == {"available": False, "note": note, "device_name": None, "driver": None}
    assert shutdowns == []  # nothing to shut down after a failed init
    assert _sampler_threads() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real pynvml on a machine without a GPU")
def test_nvml_real_library_without_gpu_does_not_crash() -> None:
    with NvmlSampler("cuda") as nvml:
        pass
    assert nvml.available is False
    assert nvml.note is not None and nvml.note.startswith("NVML not available")
    env = nvml_environment("cuda")
    assert env["available"] is False and env["note"].startswith("NVML not available")


def test_nvml_without_pynvml_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, None)
    with NvmlSampler("cuda") as nvml:
        pass
    assert nvml.available is False
    assert nvml.note.startswith("NVML not available: the nvidia-ml-py package is not installed")


def test_nvml_sampler_thread_collects_samples(monkeypatch: pytest.MonkeyPatch, no_device_properties: None) -> None:
    fake = _FakeNvml(used=[1000, 3000, 2000, 5000, 4000], then=500, utilization=37, wait_for=8)
    _install(monkeypatch, fake)
    with NvmlSampler(torch.device("cuda:1"), interval_ms=1.0) as nvml:
        assert nvml.available is True
        assert len(_sampler_threads()) == 1
        assert fake.reached.wait(5.0), "the sampler thread never sampled"
    assert _sampler_threads() == []
    assert (fake.init_calls, fake.shutdown_calls) == (1, 1)
    assert fake.pci_calls == [] and fake.index_calls == [1]  # device properties failed: index fallback
    assert len(nvml.samples) == fake.served >= 9  # one on enter, ≥ 7 in the thread, one on exit
    assert [s[1] for s in nvml.samples[:6]] == [1000, 3000, 2000, 5000, 4000, 500]
    assert nvml.note is None

    d = nvml.to_dict()
    assert d["available"] is True
    assert d["interval_ms"] == 1.0
    assert d["samples"] == fake.served
    assert d["peak_used_bytes"] == 5000
    assert d["baseline_used_bytes"] == 1000
    assert d["peak_utilization_pct"] == 37
    assert d["mean_utilization_pct"] == 37.0
    assert set(d) == {
        "available", "interval_ms", "samples", "peak_used_bytes", "baseline_used_bytes",
        "peak_utilization_pct", "mean_utilization_pct", "timeline",
    }  # fmt: skip
    timeline = d["timeline"]
    assert timeline["used_bytes"] == [s[1] for s in nvml.samples]
    assert timeline["utilization_pct"] == [37] * fake.served
    assert timeline["t_ms"] == sorted(timeline["t_ms"])
    assert all(t == round(t, 1) for t in timeline["t_ms"])
    assert json.loads(json.dumps(d)) == d


def test_nvml_sampler_uses_pci_bus_id(monkeypatch: pytest.MonkeyPatch) -> None:
    props = SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0, total_memory=1, name="x")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    fake = _FakeNvml(used=[10, 20], then=30, wait_for=1)
    _install(monkeypatch, fake)
    with NvmlSampler("cuda:2", interval_ms=60_000.0) as nvml:
        pass
    assert fake.pci_calls == ["00000000:3B:00.0"]
    assert fake.index_calls == []
    assert [s[1] for s in nvml.samples] == [10, 20]  # a block shorter than the interval: enter + exit
    assert fake.shutdown_calls == 1


def test_nvml_sampler_timeline_is_downsampled(monkeypatch: pytest.MonkeyPatch, no_device_properties: None) -> None:
    fake = _FakeNvml(used=[1000, 3000, 2000, 5000, 4000], then=500, wait_for=14)
    _install(monkeypatch, fake)
    with NvmlSampler("cuda", interval_ms=1.0, max_points=3) as nvml:
        assert fake.reached.wait(5.0)
    d = nvml.to_dict()
    n = len(nvml.samples)
    assert d["samples"] == n >= 15  # ≥ 14 before exit, one on exit
    # Three buckets of n // 3 ≥ 5 samples (sizes differ by at most one): the first holds
    # 1000, 3000, 2000, 5000, 4000 (its maximum is kept), the other two only 500s.
    assert d["timeline"]["used_bytes"] == [5000, 500, 500]
    assert d["peak_used_bytes"] == 5000
    assert d["timeline"]["t_ms"] == [round(nvml.samples[i * n // 3][0], 1) for i in range(3)]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_nvml_sampler_exception_in_block_propagates_and_stops(
    monkeypatch: pytest.MonkeyPatch, no_device_properties: None, error: BaseException
) -> None:
    fake = _FakeNvml(used=[7, 8, 9], then=9, wait_for=3)
    _install(monkeypatch, fake)
    with pytest.raises(type(error)), NvmlSampler("cuda", interval_ms=1.0) as nvml:
        assert fake.reached.wait(5.0)
        raise error
    assert _sampler_threads() == []
    assert fake.shutdown_calls == 1
    assert nvml.available is True
    assert len(nvml.samples) >= 4
    assert nvml.to_dict()["peak_used_bytes"] == 9


def test_nvml_sampler_thread_error_is_recorded(monkeypatch: pytest.MonkeyPatch, no_device_properties: None) -> None:
    fake = _FakeNvml(used=[100, 300, 200], then=None)  # the 4th reading raises, and every one after
    _install(monkeypatch, fake)
    with NvmlSampler("cuda", interval_ms=1.0) as nvml:
        assert fake.failed.wait(5.0)
    assert _sampler_threads() == []
    assert fake.shutdown_calls == 1
    assert [s[1] for s in nvml.samples] == [100, 300, 200]  # the exit sample failed too: not added
    assert nvml.note == "NVML sampling stopped early: GPU is lost"  # recorded once
    d = nvml.to_dict()
    assert (d["available"], d["samples"], d["peak_used_bytes"]) == (True, 3, 300)
    assert d["note"] == "NVML sampling stopped early: GPU is lost"


def test_nvml_sampler_without_utilization(monkeypatch: pytest.MonkeyPatch, no_device_properties: None) -> None:
    fake = _FakeNvml(used=[5, 6], then=6, utilization=None, wait_for=1)  # e.g. a MIG instance
    _install(monkeypatch, fake)
    with NvmlSampler("cuda", interval_ms=60_000.0) as nvml:
        pass
    d = nvml.to_dict()
    assert d["available"] is True
    assert (d["peak_utilization_pct"], d["mean_utilization_pct"]) == (None, None)
    assert d["timeline"]["utilization_pct"] == [None, None]
    assert d["note"] == "GPU utilization not reported by NVML: Not Supported"


def test_nvml_first_sample_failure_is_unavailable(monkeypatch: pytest.MonkeyPatch, no_device_properties: None) -> None:
    fake = _FakeNvml(used=[], then=None)
    _install(monkeypatch, fake)
    with NvmlSampler("cuda") as nvml:
        pass
    assert nvml.to_dict() == {"available": False, "note": "NVML not available: GPU is lost"}
    assert (fake.init_calls, fake.shutdown_calls) == (1, 1)
    assert _sampler_threads() == []


def test_nvml_environment_with_fake_pynvml(monkeypatch: pytest.MonkeyPatch, no_device_properties: None) -> None:
    fake = _FakeNvml(used=[], then=0)
    _install(monkeypatch, fake)
    assert nvml_environment("cuda") == {
        "available": True,
        "note": None,
        "device_name": "NVIDIA H100 80GB HBM3",
        "driver": "550.54.15",
    }
    assert (fake.init_calls, fake.shutdown_calls, fake.index_calls) == (1, 1, [0])


@pytest.mark.parametrize(("interval_ms", "max_points"), [(0.0, 10), (-1.0, 10), (math.nan, 10), (20.0, 0)])
def test_nvml_sampler_bad_arguments(interval_ms: float, max_points: int) -> None:
    with pytest.raises(ValueError):
        NvmlSampler("cpu", interval_ms=interval_ms, max_points=max_points)


def test_downsample_buckets_keep_first_time_and_peaks() -> None:
    samples = [(float(i), 10 * i, i % 50) for i in range(1000)]
    samples[537] = (537.0, 10**9, 99)
    out = _downsample(samples, 100)
    assert len(out) == 100
    assert [p[0] for p in out] == [10.0 * i for i in range(100)]  # 10 samples a bucket
    assert max(p[1] for p in out) == 10**9 and out[53] == (530.0, 10**9, 99)
    assert out[0] == (0.0, 90, 9)  # max of the bucket, not its first value

    uneven = _downsample(samples[:1001] + [(1000.0, 0, 0)], 100)  # 1001 samples: buckets of 10 or 11
    assert len(uneven) == 100
    assert max(p[1] for p in uneven) == 10**9
    assert _downsample(samples, 1) == [(0.0, 10**9, 99)]
    assert _downsample(samples[:5], 5) == samples[:5]
    assert _downsample([], 3) == []
    assert _downsample([(0.0, 1, None), (1.0, 2, None)], 1) == [(0.0, 2, None)]
    with pytest.raises(ValueError):
        _downsample(samples, 0)


# --------------------------------------------------------------------------------------------
# Capacity planning
# --------------------------------------------------------------------------------------------

GIB = 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GB", 80 * GIB),
        ("80 GiB", 80 * GIB),
        ("80g", 80 * GIB),
        ("79.6GiB", 85_469_849_190),  # floor(79.6 · 2**30)
        ("81920MiB", 80 * GIB),
        ("500MB", 500 * 2**20),
        ("1TB", 2**40),
        ("1.5tib", 3 * 2**39),
        ("2k", 2048),
        ("4KiB", 4096),
        ("512B", 512),
        ("123456789", 123_456_789),
        ("  24 gb ", 24 * GIB),
    ],
)
def test_parse_memory_size(text: str, expected: int) -> None:
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "", "GB", "80 GBs", "80PB", "-5GB", "1e9", "0", "0GB", "0.1B", "8 0GB"])
def test_parse_memory_size_rejects(text: str) -> None:
    with pytest.raises(UserError) as info:
        parse_memory_size(text)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith(f"--gpu-memory: {text!r} is not a ")
    assert message.endswith("memory size; give e.g. 80GB, 24GiB or 81920MiB")


def test_parse_memory_size_message() -> None:
    with pytest.raises(
        UserError, match=r"^--gpu-memory: 'abc' is not a memory size; give e\.g\. 80GB, 24GiB or 81920MiB$"
    ):
        parse_memory_size("abc")
    with pytest.raises(UserError, match=r"^--max-kv-bytes: '0' is not a positive memory size; give e\.g\. 80GB"):
        parse_memory_size("0", option="--max-kv-bytes")


def test_detect_memory_budget_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightkv_cli.measure import memory

    monkeypatch.setattr(memory, "system_memory_bytes", lambda: 17_179_869_184)
    assert detect_memory_budget("cpu") == (17_179_869_184, "system memory (CPU)")
    assert detect_memory_budget(None) == (17_179_869_184, "system memory (CPU)")
    monkeypatch.setattr(memory, "system_memory_bytes", lambda: None)
    with pytest.raises(UserError, match="--gpu-memory"):
        detect_memory_budget(torch.device("cpu"))


def test_detect_memory_budget_cpu_real() -> None:
    memory, source = detect_memory_budget("cpu")
    assert source == "system memory (CPU)"
    if os.path.exists("/proc/meminfo"):
        assert memory > 100e6


def test_detect_memory_budget_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    props = SimpleNamespace(total_memory=85_520_809_984, name="NVIDIA H100 80GB HBM3")
    seen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: seen.append(device) or props)
    assert detect_memory_budget("cuda:1") == (85_520_809_984, "detected: NVIDIA H100 80GB HBM3")
    assert seen == [torch.device("cuda:1")]


def test_max_concurrent_requests() -> None:
    assert max_concurrent_requests(80 * GIB, 14 * GIB, GIB) == 66
    assert max_concurrent_requests(80 * GIB, 14 * GIB, GIB, reserve_bytes=GIB) == 65
    assert max_concurrent_requests(80 * GIB, 14 * GIB, GIB, reserve_bytes=GIB + 1) == 64  # 64.99… → 64
    assert max_concurrent_requests(100, 10, 30.0) == 3  # exactly 3
    assert max_concurrent_requests(100, 10, 30.0, reserve_bytes=1) == 2
    assert max_concurrent_requests(10, 0, 2.5) == 4
    assert max_concurrent_requests(3, 0, 0.1) == 30  # not 29 from 0.1's binary representation
    assert max_concurrent_requests(10, 10, 1) == 0  # the weights fill the memory
    assert max_concurrent_requests(10, 20, 1) == 0  # the weights do not fit
    assert max_concurrent_requests(10, 5, 6) == 0  # one request does not fit
    assert isinstance(max_concurrent_requests(10, 0, 2.5), int)


@pytest.mark.parametrize("kv", [0, 0.0, -1.0, math.nan, math.inf])
def test_max_concurrent_requests_bad_kv(kv: float) -> None:
    with pytest.raises(ValueError):
        max_concurrent_requests(80 * GIB, GIB, kv)


def test_max_concurrent_requests_negative_bytes() -> None:
    with pytest.raises(ValueError):
        max_concurrent_requests(-1, 0, 1)
    with pytest.raises(ValueError):
        max_concurrent_requests(10, 0, 1, reserve_bytes=-1)
