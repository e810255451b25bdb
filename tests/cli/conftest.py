"""Fixtures shared by the command-line tests."""

from __future__ import annotations

import pytest

from lightkv_cli.errors import UserError


@pytest.fixture
def captured(monkeypatch):
    """The ``SweepRequest`` of the command; the command then stops with a user error ``captured``."""
    import lightkv_cli.engine.job as job

    got = []

    def _capture(request, events=None):
        got.append(request)
        raise UserError("captured")

    monkeypatch.setattr(job, "run_sweep", _capture)
    return got
