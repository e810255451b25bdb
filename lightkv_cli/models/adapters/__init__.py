"""Family adapters: the model-specific facts a compression method needs, and nothing else.

A compressor never looks at a model class directly. It asks the adapter for the language model
(``.layers``, ``.rotary_emb``, its config), where the vision tokens of each prompt are and on what
grid they lie, and which rotary function the attention uses. Adding a family (LLaVA-NeXT,
Qwen2-VL, ...) means adding an adapter here, not touching the methods.

One module per family (``llava``: LLaVA-1.5 and LLaVA-NeXT; ``qwen``: Qwen2-VL and Qwen2.5-VL) on the
contract in ``base``; this module maps ``config.model_type`` to its adapter.
"""

from __future__ import annotations

from torch import nn

from lightkv_cli.errors import UserError
from lightkv_cli.models.adapters.base import FamilyAdapter, VisionLayout
from lightkv_cli.models.adapters.llava import LlavaAdapter, LlavaNextAdapter
from lightkv_cli.models.adapters.qwen import Qwen2_5_VLAdapter, Qwen2VLAdapter

__all__ = ["FamilyAdapter", "VisionLayout", "adapter_for", "supported_families"]

_ADAPTERS: dict[str, type[FamilyAdapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2_5_VLAdapter,
}


def supported_families() -> list[str]:
    """``config.model_type`` values with an adapter."""
    return sorted(_ADAPTERS)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of ``model``'s family.

    Raises:
        UserError: the family is not supported yet (names the supported ones).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        raise UserError(
            f"model family '{model_type}' ({type(model).__name__}) is not supported yet; "
            f"supported: {', '.join(supported_families())}"
        )
    return cls(model)
