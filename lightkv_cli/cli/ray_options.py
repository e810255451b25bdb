"""Options of ``lightkv sweep`` that spread its runs over a Ray cluster (``--ray``, ``--ray-address``,
``--workers``), checked into :class:`~lightkv_cli.engine.distributed.RayOptions`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from lightkv_cli.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from lightkv_cli.engine.distributed import RayOptions

RayOpt = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Spread the runs over the workers of a Ray cluster, each loading the model once on its own GPU (CPU "
        "workers when the cluster has no GPU); the timing pass runs on one worker. Needs Ray: "
        'pip install "lightkv\\[ray]".',
    ),
]


RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="ADDRESS",
        help="The Ray cluster to use with --ray (ray.init's address, e.g. auto or ray://host:10001; default: start "
        "a local cluster).",
    ),
]


WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Ray workers with --ray (default: one per GPU of the cluster, or 2 CPU workers when it has none).",
    ),
]


def ray_options(ray: bool, address: str | None, workers: int | None, device_map: str | None) -> RayOptions | None:
    """The Ray options of ``lightkv sweep``, or None without ``--ray``; checks that Ray is installed, before
    anything loads.

    Raises:
        UserError: ``--ray-address`` or ``--workers`` without ``--ray``, ``--workers`` below 1, ``--device-map``
            with ``--ray``, or Ray not installed (naming the extra to install).
    """
    if not ray:
        given = [name for name, value in (("--ray-address", address), ("--workers", workers)) if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} only apply with --ray; add --ray to run the sweep on Ray workers")
        return None
    if device_map is not None:
        raise UserError(
            "--device-map spreads one model over several devices, --ray gives each worker one device; give only one"
        )
    from lightkv_cli.engine.distributed import RayOptions, import_ray

    options = RayOptions(address=address, workers=workers)
    import_ray()
    return options
