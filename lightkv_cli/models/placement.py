"""Placing a model larger than one device with accelerate (``--device-map``).

``from_pretrained(device_map=...)`` lets accelerate split the decoder layers over the available GPUs, then CPU
memory, then disk (an offload folder); accelerate's hooks move each layer's inputs to the layer's device. lightkv's
hooks follow the tensors they receive, so they run unchanged on a split model; this module only builds the loader
arguments and reports where the model went.
"""

from __future__ import annotations

import tempfile

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def placement_kwargs(device_map: str | dict | None) -> dict:
    """Extra ``from_pretrained`` arguments for ``device_map`` (none when it is None).

    Disk offload writes to a fresh temporary folder (``lightkv-offload-*``), removed by the OS's temp cleanup.
    """
    if device_map is None:
        return {}
    return {"device_map": device_map, "offload_folder": tempfile.mkdtemp(prefix="lightkv-offload-")}


def placed(model, name: str, device, device_map) -> tuple[object, object, list[str]]:
    """Put ``model`` on ``device``, or, when accelerate placed it, report where.

    Returns:
        ``(model in eval mode, device inputs go to, notes)``: with a device map, inputs go to the device of the
        input embeddings (CPU when they are offloaded to disk).
    """
    if device_map is None:
        return model.to(device).eval(), device, []
    import torch

    emb = model.get_input_embeddings().weight.device
    dev = emb if emb.type != "meta" else torch.device("cpu")
    places = sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()})
    return model.eval(), dev, [f"{name}: placed by accelerate over {', '.join(places) or str(dev)} (--device-map)"]


def cuda_devices(model) -> list:
    """The CUDA devices accelerate placed parts of ``model`` on (``hf_device_map`` values such as ``0`` or
    ``"cuda:1"``), in index order; empty for a model on one device, on CPU or disk."""
    import torch

    found = set()
    for where in (getattr(model, "hf_device_map", None) or {}).values():
        if isinstance(where, int):
            found.add(where)
        elif isinstance(where, str) and where.startswith("cuda"):
            found.add(int(where.split(":")[1]) if ":" in where else 0)
        elif isinstance(where, torch.device) and where.type == "cuda":
            found.add(where.index or 0)
    return [torch.device("cuda", i) for i in sorted(found)]
