"""``lightkv sweep --config``: the file's options are defaults (click's ``default_map``), the command line
wins, ``[thresholds]`` and ``[[schedules]]`` are merged by the command. No model is loaded: the request
the command builds is captured where it would run."""

from __future__ import annotations

import shlex

import pytest
from cli_output import _assert_user_error

from lightkv_cli.cli import app
from lightkv_cli.profiles import SweepConfig


def _sweep_with(runner, cfg, *args):
    result = runner.invoke(app, ["sweep", "--config", str(cfg), *args])
    _assert_user_error(result, "captured")
    return result


def test_config_values_are_defaults_and_the_command_line_wins(runner, captured, two_images, tmp_path):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(
        'model = "tiny"\nimages = ["imgs"]\nmethods = ["lightkv-uniform", "random"]\nretentions = [0.8, 0.6]\n'
        'repeats = 1\nwarmup = 0\noutput = "out"\ngpu_memory = "2GiB"\n'
        "[thresholds]\nmax_kl = 0.5\nmin_answer_match = 0.7\n"
    )
    _sweep_with(runner, cfg, "--repeats", "2", "--min-answer-match", "0.9", "--device", "cpu")
    (req,) = captured
    s = req.settings
    assert s.methods == ["lightkv-uniform", "random"] and list(s.retentions) == [0.8, 0.6]
    assert (s.repeats, s.warmup, s.max_new_tokens) == (2, 0, 32)
    assert s.memory_budget == 2 * 2**30 and s.memory_source == "--gpu-memory 2GiB"
    # [thresholds] is the base, the command line overrides it, keys it leaves out keep their defaults.
    assert (s.thresholds.max_kl, s.thresholds.min_answer_match, s.thresholds.min_top1_agreement) == (0.5, 0.9, 0.95)
    # Relative paths are relative to the config file's folder.
    assert list(req.images) == [two_images] and req.output == tmp_path / "out"
    assert (req.model, req.device, req.limit) == ("tiny", "cpu", None)
    # The recorded command names the file, not the values taken from it.
    assert req.command == (
        f"lightkv sweep --config {shlex.quote(str(cfg))} --repeats 2 --min-answer-match 0.9 --device cpu"
    )


@pytest.mark.parametrize(
    "extra, args, schedules, targets",
    [
        ("", [], ["L4-8/W2-1/r0.5-0.5"], []),  # schedules alone: only those
        ("retentions = [0.5]\n", [], ["L4-8/W2-1/r0.5-0.5"], [0.5]),  # retentions in the file run too
        ("", ["--retentions", "0.7"], ["L4-8/W2-1/r0.5-0.5"], [0.7]),
        ("", ["--layers", "4", "--ratios", "0.25"], ["L4/W4/r0.25"], []),  # --layers replaces the file's schedules
    ],
)
def test_config_schedules_and_targets(runner, captured, two_images, tmp_path, extra, args, schedules, targets):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(
        f'model = "tiny"\nimages = ["{two_images}"]\n{extra}[[schedules]]\nlayers = [4, 8]\nwindows = [2, 1]\n'
        "ratios = [0.5]\n"
    )
    _sweep_with(runner, cfg, *args)
    (req,) = captured
    assert [sc.label() for sc in req.settings.schedules] == schedules
    assert list(req.settings.retentions) == targets


def test_config_errors_are_one_line_before_anything_runs(runner, captured, tmp_path):
    missing = tmp_path / "nope.toml"
    _assert_user_error(runner.invoke(app, ["sweep", "--config", str(missing)]), "sweep config", "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("repeats = 0\n")
    _assert_user_error(runner.invoke(app, ["sweep", "--config", str(bad)]), "field 'repeats'")
    assert not captured


def test_every_config_key_is_a_sweep_option():
    from typer.main import get_command

    options = {p.name for p in get_command(app).commands["sweep"].params}
    keys = set(SweepConfig.model_fields) - set(SweepConfig.TABLES)
    assert keys and keys <= options, keys - options
    assert set(SweepConfig.TABLES) <= set(SweepConfig.model_fields) and not set(SweepConfig.TABLES) & options
