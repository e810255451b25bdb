"""The performance benchmark harness, at CPU scale: exact token counts and bytes, the published
schedule's retention, the largest-batch search, the compression-step breakdown."""

from __future__ import annotations

import json

from lightkv_cli.cli import app
from lightkv_cli.engine.bench import PROMPT_TOKENS, largest_batch
from lightkv_cli.measure.costs import kv_bytes_per_token


def test_largest_batch_search():
    for limit_fit in (0, 1, 2, 37, 64, 1000):
        got, probes = largest_batch(lambda b, n=limit_fit: b <= n)
        assert got == limit_fit
        assert len(probes) <= 2 * max(1, limit_fit).bit_length() + 2
    got, _ = largest_batch(lambda b: True, limit=100)
    assert got == 100


def test_bench_cpu_small(runner, tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(
        app,
        [
            "bench",
            "--arch",
            "cpu-small",
            "--batches",
            "2",
            "--images-per-prompt",
            "1,2",
            "--retentions",
            "0.75",
            "--new-tokens",
            "3",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--profile-batch",
            "2",
            "--device",
            "cpu",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    res = json.loads((out / "cpu-small-cpu.json").read_text())
    assert res["complete"] is True and res["largest_batch"] is None and "CPU" in res["largest_batch_note"]
    assert (out / "cpu-small-cpu.md").read_text().startswith("**cpu-small**")
    cells = {(c["method"], c["images"]): c for c in res["cells"]}
    assert set(cells) == {(m, i) for m in ("uncompressed", "lightkv-published", "lightkv@0.75") for i in (1, 2)}
    from transformers import LlamaConfig

    from lightkv_cli.models.tiny import TEXT_CONFIG

    per_token = kv_bytes_per_token(LlamaConfig(**TEXT_CONFIG), __import__("torch").float32)
    for images in (1, 2):
        base, pub = cells[("uncompressed", images)], cells[("lightkv-published", images)]
        n_vis = 576 * images
        # Exact bytes: 32 layers × 2 rows × tokens × 2·H_kv·d·4.
        assert base["kv_bytes_vision"] == 32 * 2 * n_vis * per_token
        assert base["kv_bytes"] == 32 * 2 * (n_vis + PROMPT_TOKENS) * per_token
        # Published schedule (12, 18, 24 / 4, 2, 1 / 0.5): per image 576 → 288 → 144 → 72 vision tokens
        # after layers 12, 18, 24, i.e. R = (13 + 6/2 + 6/4 + 7/8) / 32.
        assert pub["vision_retention"] == (13 + 6 / 2 + 6 / 4 + 7 / 8) / 32
        seq = pub["layer_seq_lens"]
        assert seq[12] == n_vis + PROMPT_TOKENS and seq[13] == n_vis // 2 + PROMPT_TOKENS
        assert seq[19] == n_vis // 4 + PROMPT_TOKENS and seq[31] == n_vis // 8 + PROMPT_TOKENS
        for c in (pub, cells[("lightkv@0.75", images)]):
            # Vision-token KV bytes = measured retention × uncompressed, exactly.
            assert abs(c["kv_bytes_vision"] - c["vision_retention"] * base["kv_bytes_vision"]) < 1e-6
            assert c["kv_vision_ratio"] == c["vision_retention"]
            assert c["prefill_ratio"] > 0 and c["decode_ms_per_token"]["n"] == 2
    br = res["compression_breakdown"]
    assert br["method"] == "lightkv-published" and br["batch"] == 2 and br["clock"] == "cpu"
    assert br["ranges"]["lightkv::stage"]["calls"] == 3  # one per stage layer
    assert {"lightkv::match", "lightkv::guidance", "lightkv::merge"} <= set(br["ranges"])
    # synthetic prompts have no padding: with SDPA the compressed layers need no mask, so none is built
    assert "lightkv::mask" not in br["ranges"]
    assert 0 < br["share_of_uncompressed_prefill"] < 1


def test_bench_bad_options(runner, tmp_path):
    result = runner.invoke(app, ["bench", "--arch", "gpt-9", "--output", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 2 and "unknown architecture 'gpt-9'" in " ".join(
        (result.output or "").split()
    ) + " ".join((result.stderr or "").split())
    result = runner.invoke(app, ["bench", "--batches", "0", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2


def test_methods_run_interleaved_with_paired_ratios(monkeypatch):
    """Warm-ups first, then rounds visiting every press once in an order rotated each round; a press that
    runs out of memory is recorded as such and the others go on; ratios pair equal rounds."""
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig

    from lightkv_cli.engine import bench
    from lightkv_cli.models.tiny import TEXT_CONFIG

    config = LlamaConfig(**TEXT_CONFIG)
    L = config.num_hidden_layers
    bm = SimpleNamespace(
        model=SimpleNamespace(config=config),
        device=torch.device("cpu"),
        dtype=torch.float32,
        image_token_id=3,
        vision_tokens_per_image=4,
        image_size=8,
        vocab_size=50,
    )
    a, b, oom = object(), object(), object()
    calls, clock = [], iter(range(1, 1000))

    def fake_generate(model, inputs, n_vis, new_tokens, _, press=None, suppress_token_ids=()):
        calls.append(press)
        if press is oom:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        t = float(next(clock))
        cache = SimpleNamespace(
            total_bytes=100, vision_bytes=40, vision_retention=0.4, layer_seq_lens=[10] * L, processed_seq_lens=None
        )
        return SimpleNamespace(prefill_ms=t, decode_ms=[t, t], peak_memory_bytes=7, peak_memory_kind="rss", cache=cache)

    monkeypatch.setattr(bench, "greedy_generate", fake_generate)
    got = bench.measure_interleaved(bm, [None, a, oom, b], batch=2, images=1, new_tokens=2, repeats=3, warmup=1)
    assert calls == [None, a, oom, b, None, a, b, a, b, None, b, None, a]  # oom: out after its warm-up
    assert [g["status"] for g in got] == ["ok", "ok", "oom", "ok"]
    assert "out of memory" in got[2]["error"]
    assert got[0]["prefill_rounds"] == [4.0, 9.0, 11.0] and got[1]["prefill_rounds"] == [5.0, 7.0, 12.0]
    assert got[3]["decode_rounds"] == [6.0, 8.0, 10.0] and got[3]["decode_ms_per_token"]["n"] == 6
    assert got[1]["kv_bytes"] == 200 and got[1]["flops_prefill"] > 0
