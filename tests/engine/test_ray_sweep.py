"""Sweeps on a Ray cluster (``lightkv sweep --ray``, :mod:`lightkv_cli.engine.distributed`): a real local
cluster of 2 CPU workers (shared by the tests of this module) and the tiny random-weight model.

On a CPU the last digits of a KL depend on torch's thread count; a CPU worker of 1 CPU runs torch on one
thread, so the serial sweep compared with is run on one thread too.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys

import pytest

ray = pytest.importorskip("ray")

from cli_output import _all_text, _assert_user_error, _flat  # noqa: E402

from lightkv_cli.cli import app  # noqa: E402
from lightkv_cli.engine.distributed import RayOptions  # noqa: E402
from lightkv_cli.engine.job import SweepEvents, SweepFailed, SweepInterrupted, SweepRequest, run_sweep  # noqa: E402
from lightkv_cli.engine.plan import SweepSettings  # noqa: E402

SAMPLE_NAMES = ("skimage_chelsea.png", "skimage_coffee.png")
GRID = ["--methods", "lightkv,random", "--retentions", "0.8,0.5"]
FAST = ["--model", "tiny", "--max-new-tokens", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu"]
RUN_IDS = ["uncompressed", "lightkv@0.8", "lightkv@0.5", "random@0.8", "random@0.5"]


def _settings() -> SweepSettings:
    """The settings the command line makes of ``GRID`` and ``FAST``."""
    return SweepSettings(methods=["lightkv", "random"], retentions=[0.8, 0.5], max_new_tokens=2, repeats=1, warmup=0)


@pytest.fixture(scope="module")
def cluster(_isolated_cache):
    """One local Ray cluster of 2 CPUs for the module (started after the cache is isolated: the workers
    inherit ``LIGHTKV_CACHE`` and ``HF_HUB_OFFLINE``)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    from conftest import SAMPLE_IMAGES

    d = tmp_path_factory.mktemp("ray-imgs")
    for name in SAMPLE_NAMES:
        shutil.copyfile(SAMPLE_IMAGES / name, d / name)
    return d


@pytest.fixture(scope="module")
def serial(imgs, tmp_path_factory):
    """The serial sweep of the same settings (on one thread), as the command line runs it."""
    import torch
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("serial")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, ["sweep", "--images", str(imgs), *GRID, *FAST, "--output", str(out)])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, _all_text(result)
    return json.loads((out / "results.json").read_text())


def _assert_same_quality(got: dict, want: dict) -> None:
    """Same runs in the same order, every quality figure equal, per run and per input; same recommendation."""
    assert [r["id"] for r in got["runs"]] == [r["id"] for r in want["runs"]] == RUN_IDS
    for g, w in zip(got["runs"], want["runs"]):
        assert g["status"] == w["status"] == "ok", g.get("error")
        assert g["quality"] == w["quality"], g["id"]
        for key in ("kv_bytes", "kv_bytes_vision", "vision_retention", "flops_prefill", "kv_ratio", "flops_ratio"):
            assert g[key] == w[key], (g["id"], key)
        assert [(p["answer"], p["quality"]) for p in g["per_input"]] == [
            (p["answer"], p["quality"]) for p in w["per_input"]
        ], g["id"]
    assert got["recommendation"] == want["recommendation"]
    assert got["quality_pass"]["notes"] == want["quality_pass"]["notes"]


def _wait_for_free_cpus(n: int = 2, seconds: float = 20.0) -> float:
    """The cluster's free CPUs once ``n`` are free again (the actors killed), or after ``seconds``."""
    import time

    end = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < n and time.monotonic() < end:
        time.sleep(0.1)
    return ray.available_resources().get("CPU", 0)


def test_ray_sweep_gives_the_serial_sweeps_runs_and_quality(cluster, serial, imgs, tmp_path, runner):
    import lightkv_cli

    # The workers import this checkout's lightkv, not another installed copy.
    where = ray.remote(num_cpus=1)(lambda: __import__("lightkv_cli").__file__)
    assert ray.get(where.remote()) == lightkv_cli.__file__
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["sweep", "--images", str(imgs), *GRID, *FAST, "--output", str(out), "--ray", "--workers", "2"]
    )
    assert result.exit_code == 0, _all_text(result)
    got = json.loads((out / "results.json").read_text())
    _assert_same_quality(got, serial)
    assert got["complete"] is True and got["model"] == serial["model"]
    assert got["settings"] == serial["settings"] and got["inputs_fingerprint"] == serial["inputs_fingerprint"]
    # The timing pass (one worker) timed every run, paired with the reference's round.
    assert got["timing_pass"]["rounds_done"] == 1 and got["timing_pass"]["order"][0] != []
    assert sorted(got["timing_pass"]["order"][0]) == sorted(RUN_IDS)
    assert all(r["prefill_ms"]["median"] > 0 and r["timing"]["batches"][0]["status"] == "ok" for r in got["runs"])
    assert all(r["timing_ratio"]["prefill"] is not None for r in got["runs"][1:])
    assert f"recommended: {got['recommendation']['run']}" in _flat(_all_text(result))
    # The actors were killed at the end: the cluster's 2 CPUs are free again.
    assert _wait_for_free_cpus() == 2


class _Killer(SweepEvents):
    """Kills the worker a run is given to, at the 2nd and 3rd dispatch of the quality runs."""

    def __init__(self) -> None:
        self.dispatched: list[tuple[int, str]] = []
        self.finished: list[str] = []

    def ready(self, sweep, moved_aside) -> None:
        sweep.on_dispatch = self._dispatch

    def _dispatch(self, worker, run_id: str) -> None:
        self.dispatched.append((worker.index, run_id))
        if len(self.dispatched) in (2, 3):
            ray.kill(worker.actor)

    def progress(self, phase: str, run_id: str, inputs: int) -> None:
        if phase == "quality" and run_id not in self.finished:
            self.finished.append(run_id)


def test_killed_workers_keep_finished_runs_and_resume_completes(cluster, serial, imgs, tmp_path, runner):
    out = tmp_path / "out"
    request = SweepRequest(
        _settings(), model="tiny", device="cpu", images=[imgs], output=out, ray=RayOptions(workers=2), command="test"
    )
    events = _Killer()
    with pytest.raises(SweepFailed) as failed:
        run_sweep(request, events)
    message = str(failed.value)
    assert "\n" not in message and "every Ray worker died" in message and "--resume" in message
    assert f"the 2 finished run(s) are in {out / 'results.json'}" in message
    # Worker 1 was killed with lightkv@0.5; it went to worker 0 (once), which was killed too.
    assert events.dispatched == [(0, "lightkv@0.8"), (1, "lightkv@0.5"), (0, "lightkv@0.5")]
    kept = json.loads((out / "results.json").read_text())
    assert [r["id"] for r in kept["runs"]] == ["uncompressed", "lightkv@0.8"] and kept["complete"] is False
    for r in kept["runs"]:
        assert r["quality"] == next(s for s in serial["runs"] if s["id"] == r["id"])["quality"]
    # --resume on Ray: the reference is recomputed on one worker and shared, only the 3 pending runs run.
    result = runner.invoke(
        app, ["sweep", "--images", str(imgs), *GRID, *FAST, "--output", str(out), "--ray", "--resume"]
    )
    assert result.exit_code == 0, _all_text(result)
    assert "resuming: 2 run(s) already in" in _flat(_all_text(result))
    done = json.loads((out / "results.json").read_text())
    _assert_same_quality(done, serial)
    assert done["complete"] is True and done["created"] == kept["created"]
    assert _wait_for_free_cpus() == 2


class _CtrlC(SweepEvents):
    """Ctrl-C on the driver as the third quality run finishes (before it is recorded, as a serial sweep's
    Ctrl-C during a run's last batch)."""

    def __init__(self) -> None:
        self.finished: list[str] = []

    def progress(self, phase: str, run_id: str, inputs: int) -> None:
        if phase == "quality" and run_id not in self.finished:
            self.finished.append(run_id)
            if len(self.finished) == 3:
                raise KeyboardInterrupt


def test_ctrl_c_keeps_the_finished_runs_and_shuts_the_workers_down(cluster, serial, imgs, tmp_path):
    out = tmp_path / "out"
    request = SweepRequest(_settings(), model="tiny", device="cpu", images=[imgs], output=out, ray=RayOptions())
    with pytest.raises(SweepInterrupted) as stop:
        run_sweep(request, _CtrlC())
    assert stop.value.signum == 2
    on_disk = json.loads((out / "results.json").read_text())
    ids = [r["id"] for r in on_disk["runs"]]
    assert ids == [r["id"] for r in stop.value.results["runs"]]
    assert len(ids) == 2 and ids[0] == "uncompressed" and ids[1] in ("lightkv@0.8", "lightkv@0.5")
    for r in on_disk["runs"]:
        assert r["quality"] == next(s for s in serial["runs"] if s["id"] == r["id"])["quality"]
    assert _wait_for_free_cpus() == 2  # the actors were killed


def test_missing_ray_is_one_line_with_the_install_command(runner, imgs, no_model_load, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    got = runner.invoke(app, ["sweep", "--images", str(imgs), *FAST, "--ray"])
    _assert_user_error(got, "--ray needs Ray", 'pip install "lightkv[ray]"')
    assert no_model_load == []


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--ray", "--workers", "0"], ["--workers must be at least 1, got 0"]),
        (["--workers", "2"], ["--workers only apply with --ray", "add --ray"]),
        (["--ray-address", "auto"], ["--ray-address only apply with --ray"]),
        (["--ray", "--device-map", "auto"], ["--device-map", "--ray", "give only one"]),
    ],
)
def test_ray_usage_errors(runner, imgs, no_model_load, args, fragments):
    _assert_user_error(runner.invoke(app, ["sweep", "--images", str(imgs), *FAST, *args]), *fragments)
