"""The ``lightkv`` command line. Thin: parse, call the library, print.

User mistakes (bad paths, unknown model, invalid values) print one red line naming the problem and
the fix, and exit with status 2; an interrupted profile keeps every finished run on disk and exits
with status 130. One module per command group; importing this package registers them all.
"""

from __future__ import annotations

# Importing a command module registers its commands on the app, in the order `lightkv --help` lists them.
# isort: off
from lightkv_cli.cli import run  # noqa: F401  profile, sweep
from lightkv_cli.cli import info  # noqa: F401  models, methods
from lightkv_cli.cli import report  # noqa: F401
from lightkv_cli.cli import bench  # noqa: F401
from lightkv_cli.cli import check  # noqa: F401

# isort: on
from lightkv_cli.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
