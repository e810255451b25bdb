"""The shared sweep path (``run_sweep``): events in order, the old results file moved aside, Ctrl-C keeps
the finished runs, errors before the model loads; and the run ids."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
from conftest import SAMPLE_IMAGES

from lightkv_cli.engine.ids import run_id
from lightkv_cli.engine.job import SweepEvents, SweepInterrupted, SweepRequest, run_sweep
from lightkv_cli.engine.plan import SweepSettings
from lightkv_cli.errors import UserError
from lightkv_cli.methods.schedule import Schedule

FAST = dict(max_new_tokens=2, repeats=1, warmup=0)
SCHED = Schedule.build([4, 8], [2, 1], [0.5])


class Recorder(SweepEvents):
    """Every event, in order."""

    def __init__(self):
        self.seen = []

    def inputs_read(self, inputs):
        self.seen.append(("inputs", len(inputs.items), [s.path.name for s in inputs.skipped]))

    def loading_model(self, name):
        self.seen.append(("loading", name))
        return nullcontext()

    def model_loaded(self, loaded):
        self.seen.append(("loaded", loaded.name))

    def note(self, text):
        self.seen.append(("note", text))

    def ready(self, sweep, moved_aside):
        self.seen.append(("ready", [r.id for r in sweep.pending], moved_aside))

    def running(self):
        self.seen.append(("running",))
        return nullcontext()

    def phase(self, name, total):
        self.seen.append(("phase", name, total))

    def progress(self, phase, run_id, inputs):
        self.seen.append(("progress", phase, run_id, inputs))


@pytest.fixture
def one_image(tmp_path):
    """A folder with one sample image and one broken file."""
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "skimage_chelsea.png").write_bytes((SAMPLE_IMAGES / "skimage_chelsea.png").read_bytes())
    (d / "broken.png").write_bytes(b"")
    return d


@pytest.fixture
def loads_tiny(tiny, monkeypatch):
    """``load_model`` returns the session's tiny model (and records what it was asked for)."""
    import lightkv_cli.models.loader as loader

    calls = []

    def _load(name, **kwargs):
        calls.append((name, kwargs))
        return tiny

    monkeypatch.setattr(loader, "load_model", _load)
    return calls


def test_run_ids():
    assert run_id("uncompressed") == "uncompressed"
    assert run_id("lightkv", target=0.55) == "lightkv@0.55"
    assert run_id("vlcache", target=0.4000) == "vlcache@0.4"
    assert run_id("lightkv", schedule=Schedule.build([12, 18, 24], [4, 2, 1], [0.5])) == (
        "lightkv[L12-18-24/W4-2-1/r0.5-0.5-0.5]"
    )
    for bad in (dict(), dict(target=0.5, schedule=SCHED)):
        with pytest.raises(ValueError):
            run_id("lightkv", **bad)


def test_events_in_order_and_old_results_moved_aside(tiny, loads_tiny, one_image, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    settings = SweepSettings(methods=["lightkv", "fastv"], retentions=[], schedules=[SCHED], **FAST)
    events = Recorder()
    request = SweepRequest(settings, model="tiny", device="cpu", images=[one_image], output=out, command="x")
    results = run_sweep(request, events)

    ids = ["uncompressed", "lightkv[L4-8/W2-1/r0.5-0.5]"]
    schedule_note = (
        "fastv take(s) no LightKV schedule: the explicit --layers/--windows/--ratios schedules run for the other "
        "methods only"
    )
    assert events.seen == [
        ("inputs", 1, ["broken.png"]),
        ("loading", "tiny"),
        ("loaded", tiny.name),
        *[("note", n) for n in tiny.notes],
        ("note", schedule_note),
        ("ready", ids, out / "results.json.1.bak"),
        ("running",),
        ("phase", "quality", 2),
        ("progress", "quality", ids[0], 1),
        ("progress", "quality", ids[1], 1),
        # the timing pass: one round (repeats=1), no warm-up, one input at batch 1, in the round's shuffled order
        ("phase", "timing", 2),
        *[("progress", "timing", i, 1) for i in results["timing_pass"]["order"][0]],
    ]
    assert sorted(results["timing_pass"]["order"][0]) == sorted(ids)
    assert loads_tiny == [("tiny", {"init": "pretrained", "device": "cpu", "dtype": "auto"})]
    assert (out / "results.json.1.bak").read_text() == "{}"
    on_disk = json.loads((out / "results.json").read_text())
    assert [r["id"] for r in on_disk["runs"]] == [r["id"] for r in results["runs"]] == ids
    assert on_disk["complete"] is True and on_disk["command"] == "x"
    assert [s["path"] for s in on_disk["skipped"]] == [str(one_image / "broken.png")]


def test_no_backup_when_asked_and_nothing_written_without_output(tiny, loads_tiny, one_image, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    settings = SweepSettings(retentions=[], schedules=[SCHED], **FAST)
    run_sweep(SweepRequest(settings, model="tiny", images=[one_image], output=out, backup=False))
    assert not (out / "results.json.1.bak").exists()
    assert json.loads((out / "results.json").read_text())["complete"] is True
    results = run_sweep(SweepRequest(settings, model="tiny", images=[one_image]))
    assert results["complete"] is True and sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out"]


def test_ctrl_c_keeps_the_finished_runs(tiny, loads_tiny, one_image, tmp_path, monkeypatch):
    import lightkv_cli.engine.sweep as engine_sweep

    real = engine_sweep.greedy_generate

    def interrupted(*args, press=None, **kwargs):
        if press is not None:
            raise KeyboardInterrupt
        return real(*args, press=press, **kwargs)

    monkeypatch.setattr(engine_sweep, "greedy_generate", interrupted)
    settings = SweepSettings(retentions=[], schedules=[SCHED], **FAST)
    out = tmp_path / "out"
    with pytest.raises(SweepInterrupted) as stop:
        run_sweep(SweepRequest(settings, model="tiny", images=[one_image], output=out))
    assert isinstance(stop.value, KeyboardInterrupt)
    assert [r["id"] for r in stop.value.results["runs"]] == ["uncompressed"]
    assert json.loads((out / "results.json").read_text())["complete"] is False


def test_a_hook_can_stop_the_sweep_before_any_run(tiny, loads_tiny, one_image, tmp_path):
    class Refuse(SweepEvents):
        def model_loaded(self, loaded):
            raise UserError("not this model")

    out = tmp_path / "out"
    settings = SweepSettings(retentions=[0.5], **FAST)
    with pytest.raises(UserError, match="not this model"):
        run_sweep(SweepRequest(settings, model="tiny", images=[one_image], output=out), Refuse())
    assert out.is_dir() and not (out / "results.json").exists()


def test_input_errors_come_before_the_output_folder_and_the_model(no_model_load, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    out = tmp_path / "out"
    request = SweepRequest(SweepSettings(), model="tiny", images=[empty], output=out)
    with pytest.raises(UserError, match=r"no image files in .*empty \(ignored 1 non-image file\(s\)\)"):
        run_sweep(request)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    events = Recorder()
    with pytest.raises(UserError, match="nothing could be processed"):
        run_sweep(SweepRequest(SweepSettings(), model="tiny", images=[broken], output=out), events)
    assert events.seen == [("inputs", 0, ["a.png"])]
    assert not out.exists() and not no_model_load


def test_settings_refuse_unknown_positions():
    with pytest.raises(UserError, match="--positions must be keep or renumber, got 'shift'"):
        SweepSettings(positions="shift")
