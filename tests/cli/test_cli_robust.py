"""Every finished run kept (issue 22): out of memory anywhere, two sweeps into one folder, SIGTERM, writes
that fail, a console that goes away. Each class: no traceback, the expected exit status, a valid
results.json with the finished runs, no temporary file left, earlier results kept.

In-process tests (CliRunner) reuse the session's tiny model; the signal and stdout tests run the real
command in a subprocess (its generation slowed down, so a signal lands between runs).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_output import _all_text, _flat, _stderr

from lightkv_cli.cli import app

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--max-new-tokens", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu"]
CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "99999999999 bytes. Error code 12 (Cannot allocate memory)"
)
OOMS = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu-allocator": lambda: RuntimeError(CPU_OOM),
    "cpu-not-enough": lambda: RuntimeError("not enough memory: you tried to allocate 123 bytes."),
    "memoryerror": lambda: MemoryError(),
}


@pytest.fixture
def uses_tiny(tiny, monkeypatch):
    """The CLI gets the session's tiny model instead of loading it again."""
    import lightkv_cli.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda name, **kw: tiny)


def _profile(runner, out: Path, images: Path, *args: str):
    return runner.invoke(
        app, ["profile", "--model", "tiny", "--images", str(images), "--limit", "1", *FAST, "-o", str(out), *args]
    )


def _assert_clean(text: str, out: Path) -> None:
    assert "Traceback" not in text, text
    assert not list(out.glob(".*.tmp")), sorted(p.name for p in out.iterdir())
    assert not (out / ".lightkv.lock").exists()


def _one_error_line(result, out: Path) -> str:
    """Assert exit 1 with exactly one ``error:`` line, no traceback and nothing stray in ``out``; the flat text."""
    text = _all_text(result)
    assert result.exit_code == 1, text
    _assert_clean(text, out)
    errors = [ln for ln in _stderr(result).splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text
    return _flat(text)


def _fail_generation(monkeypatch, exc_factory, when):
    import lightkv_cli.engine.sweep as engine_sweep

    real = engine_sweep.greedy_generate

    def flaky(*args, press=None, **kwargs):
        if when(press):
            raise exc_factory()
        return real(*args, press=press, **kwargs)

    monkeypatch.setattr(engine_sweep, "greedy_generate", flaky)


# --------------------------------------------------------------------------------------------------
# 1. Out of memory
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(OOMS))
def test_oom_in_a_compressed_run_is_recorded_as_oom(runner, uses_tiny, two_images, tmp_path, monkeypatch, kind):
    _fail_generation(monkeypatch, OOMS[kind], lambda press: press is not None)
    out = tmp_path / "out"
    result = _profile(runner, out, two_images, "--retentions", "1.0,0.5")
    text = _all_text(result)
    assert result.exit_code == 0, text
    _assert_clean(text, out)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["id"], r["status"]) for r in runs] == [("uncompressed", "ok"), ("lightkv@0.5", "oom")]
    assert runs[1]["error"].startswith("out of memory")
    assert (out / "report.html").is_file()


@pytest.mark.parametrize("kind", list(OOMS))
def test_oom_in_the_reference_is_one_line_and_recorded(runner, uses_tiny, two_images, tmp_path, monkeypatch, kind):
    _fail_generation(monkeypatch, OOMS[kind], lambda press: press is None)
    out = tmp_path / "out"
    result = _profile(runner, out, two_images, "--retentions", "1.0,0.5")
    flat = _one_error_line(result, out)
    assert "the uncompressed reference run on cpu ran out of memory" in flat and "--init random" in flat
    assert f"recorded in {out / 'results.json'}" in flat
    saved = json.loads((out / "results.json").read_text())
    assert [(r["id"], r["status"]) for r in saved["runs"]] == [("uncompressed", "oom")]
    assert saved["complete"] is False


def test_resume_after_a_reference_oom_runs_the_reference_again(runner, uses_tiny, two_images, tmp_path, monkeypatch):
    import lightkv_cli.engine.sweep as engine_sweep

    real = engine_sweep.greedy_generate
    _fail_generation(monkeypatch, OOMS["cpu-allocator"], lambda press: press is None)
    out = tmp_path / "out"
    assert _profile(runner, out, two_images, "--retentions", "1.0,0.5").exit_code == 1
    monkeypatch.setattr(engine_sweep, "greedy_generate", real)  # more memory now
    result = _profile(runner, out, two_images, "--retentions", "1.0,0.5", "--resume")
    assert result.exit_code == 0, _all_text(result)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["id"], r["status"]) for r in runs] == [("uncompressed", "ok"), ("lightkv@0.5", "ok")]


def test_out_of_memory_while_loading_the_model_is_one_line(runner, two_images, tmp_path, monkeypatch):
    import lightkv_cli.models.loader as loader

    def too_big(name, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB")

    monkeypatch.setattr(loader, "load_model", too_big)
    out = tmp_path / "out"
    result = _profile(runner, out, two_images)
    text = _all_text(result)
    assert result.exit_code == 1, text
    assert "Traceback" not in text
    assert "loading model 'tiny' on cpu ran out of memory" in _flat(text)


# --------------------------------------------------------------------------------------------------
# 2. One sweep per output folder; earlier results never overwritten
# --------------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("holder", ["live", "dead", "garbage", "other-host"])
def test_the_output_folder_is_locked(runner, uses_tiny, two_images, tmp_path, holder):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    lock = out / ".lightkv.lock"
    owner = {
        "live": {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00"},
        "dead": {"pid": _dead_pid(), "host": socket.gethostname()},
        "other-host": {"pid": 1234, "host": "elsewhere.example"},
    }.get(holder)
    lock.write_text(json.dumps(owner) if owner else "not json")
    result = _profile(runner, out, two_images, "--retentions", "1.0")
    text = _all_text(result)
    assert "Traceback" not in text
    if holder in ("live", "other-host"):
        assert result.exit_code == 2, text
        errors = [ln for ln in _stderr(result).splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, text
        assert f"in use by another lightkv sweep (pid {owner['pid']} on {owner['host']}" in _flat(text)
        assert (out / "results.json").read_text() == '{"earlier": true}' and lock.is_file()
        assert not list(out.glob("*.bak"))
    else:
        assert result.exit_code == 0, text
        assert "took over the lock" in _flat(text) and "no longer running" in _flat(text)
        _assert_clean(text, out)
        assert (out / "results.json.1.bak").read_text() == '{"earlier": true}'


def test_every_earlier_sweep_is_kept_as_a_numbered_backup(runner, uses_tiny, two_images, tmp_path):
    out = tmp_path / "out"
    for target in ("0.9", "0.7", "0.5"):
        result = _profile(runner, out, two_images, "--retentions", f"1.0,{target}")
        assert result.exit_code == 0, _all_text(result)
    ids = {p.name: [r["id"] for r in json.loads(p.read_text())["runs"]] for p in out.glob("results.json*")}
    assert ids == {
        "results.json.1.bak": ["uncompressed", "lightkv@0.9"],
        "results.json.2.bak": ["uncompressed", "lightkv@0.7"],
        "results.json": ["uncompressed", "lightkv@0.5"],
    }
    assert "lightkv@0.9" in (out / "report.md.1.bak").read_text()
    assert "lightkv@0.7" in (out / "report.html.2.bak").read_text()
    assert "lightkv@0.5" in (out / "report.md").read_text()
    assert "moved to" in _flat(_all_text(result)) and "results.json.2.bak" in _flat(_all_text(result))


def test_stale_temporary_files_are_removed_at_the_start(runner, uses_tiny, two_images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in (".results.json.k1ll3d.tmp", ".report.html.abc.tmp"):
        (out / name).write_text("half")
    (out / ".other.tmp").write_text("not ours")
    result = _profile(runner, out, two_images, "--retentions", "1.0")
    assert result.exit_code == 0, _all_text(result)
    assert sorted(p.name for p in out.glob(".*.tmp")) == [".other.tmp"]


# --------------------------------------------------------------------------------------------------
# 4. Writes that fail
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "meaning"),
    [
        (errno.ENOSPC, "No space left on device (ENOSPC)"),
        (errno.EFBIG, "File too large (EFBIG)"),
        (errno.EACCES, "Permission denied (EACCES)"),
    ],
)
def test_a_results_write_that_fails_is_one_line_and_keeps_the_runs(
    runner, uses_tiny, two_images, tmp_path, monkeypatch, code, meaning
):
    real = os.replace
    writes = []

    def failing(src, dst, *a, **kw):
        if Path(dst).name == "results.json":
            writes.append(dst)
            if len(writes) == 2:  # the first run is on disk; the second cannot be written
                raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", failing)
    out = tmp_path / "out"
    result = _profile(runner, out, two_images, "--retentions", "1.0,0.5")
    flat = _one_error_line(result, out)
    assert f"cannot write '{out / 'results.json'}': {meaning}" in flat
    assert "it keeps the 1 run(s) written before" in flat and "--resume" in flat
    assert [r["id"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["uncompressed"]


def test_an_unwritable_model_cache_is_one_line(runner, two_images, tmp_path, monkeypatch):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    monkeypatch.setenv("LIGHTKV_CACHE", str(blocker / "sub"))
    out = tmp_path / "out"
    result = _profile(runner, out, two_images)
    text = _all_text(result)
    assert result.exit_code == 1, text
    assert "Traceback" not in text
    flat = _flat(text)
    assert "loading model 'tiny': cannot write" in flat and "(ENOTDIR)" in flat and "LIGHTKV_CACHE" in flat


# --------------------------------------------------------------------------------------------------
# 3. SIGTERM and Ctrl-C; 4. a console that goes away (subprocesses: the real process, real signals)
# --------------------------------------------------------------------------------------------------

#: Runs the command with every generation slowed down and a marker file written when one starts.
SLOW_MAIN = """
import sys, time
from pathlib import Path
import lightkv_cli.engine.sweep as s
real, marker, delay = s.greedy_generate, Path(sys.argv[1]), float(sys.argv[2])
def slow(*a, press=None, **k):
    marker.write_text("reference" if press is None else "compressed")
    time.sleep(delay)
    return real(*a, press=press, **k)
s.greedy_generate = slow
sys.argv = ["lightkv", *sys.argv[3:]]
from lightkv_cli.cli import main
main()
"""


def _command(tmp_path: Path, images: Path, out: Path, delay: float, retentions: str) -> list[str]:
    marker = tmp_path / "marker"
    args = ["profile", "--model", "tiny", "--images", str(images), "--limit", "1", *FAST]
    return [sys.executable, "-c", SLOW_MAIN, str(marker), str(delay), *args, "--retentions", retentions, "-o", str(out)]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "HF_HUB_OFFLINE": "1", **extra}
    env.setdefault("LIGHTKV_CACHE", os.environ.get("LIGHTKV_CACHE", ""))
    return env


def _wait_for(predicate, proc, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited {proc.returncode} too early:\n{out}\n{err}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("timed out")


def _runs_on_disk(out: Path) -> int:
    try:
        return len(json.loads((out / "results.json").read_text())["runs"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGTERM, 143, "(SIGTERM)"), (signal.SIGINT, 130, "")])
def test_a_signal_after_the_first_run_keeps_it_and_writes_the_reports(tiny, two_images, tmp_path, sig, code, name):
    out = tmp_path / "out"
    cmd = _command(tmp_path, two_images, out, 0.5, "1.0,0.9,0.8,0.7,0.6,0.5")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _runs_on_disk(out) >= 1, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stdout + stderr
    assert "Traceback" not in stdout + stderr
    flat = _flat(stderr)
    assert f"interrupted{' ' + name if name else ''}:" in flat, stderr
    assert "finished run(s) are in" in flat and "(reports written)" in flat and "--resume" in flat
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][0]["id"] == "uncompressed" and saved["complete"] is False
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    _assert_clean(stdout + stderr, out)


def test_a_signal_during_the_reference_says_nothing_was_written(tiny, two_images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        _command(tmp_path, two_images, out, 3.0, "1.0,0.5"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout + stderr
    flat = _flat(stderr)
    assert "interrupted (SIGTERM) during the uncompressed reference run: no run finished" in flat, stderr
    assert f"the earlier results are in {out / 'results.json.1.bak'}" in flat
    assert not (out / "results.json").exists()
    _assert_clean(stdout + stderr, out)


def test_a_closed_stdout_keeps_the_reports(tiny, two_images, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _command(tmp_path, two_images, out, 0.0, "1.0,0.5"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=240)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert json.loads((out / "results.json").read_text())["complete"] is True


def test_a_full_stdout_is_one_line_and_keeps_the_reports(tiny, two_images, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    out = tmp_path / "out"
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            _command(tmp_path, two_images, out, 0.0, "1.0,0.5"),
            env=_env(),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=240,
        )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "cannot write the console output to '/dev/full': No space left on device (ENOSPC)" in _flat(proc.stderr)
    assert (out / "report.html").is_file() and json.loads((out / "results.json").read_text())["complete"] is True


def test_a_file_size_limit_is_one_line_not_a_kill(tiny, two_images, tmp_path):
    import resource

    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    proc = subprocess.run(
        _command(tmp_path, two_images, out, 0.0, "1.0,0.5"),
        env=_env(PYTHONDONTWRITEBYTECODE="1"),
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=limit,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    flat = _flat(proc.stderr)
    assert f"cannot write '{out / 'results.json'}': File too large (EFBIG); nothing was written" in flat, flat
    assert not (out / "results.json").exists()
    _assert_clean(proc.stderr, out)
