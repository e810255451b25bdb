"""Family adapters: the model-specific facts a compression method needs, and nothing else.

A compressor never looks at a model class directly. It asks the adapter for the language model
(``.layers``, ``.rotary_emb``, its config), where the vision tokens of each prompt are and on what
grid they lie, and which rotary function the attention uses. Adding a family (LLaVA-NeXT,
Qwen2-VL, ...) means adding an adapter here, not touching the methods.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lightkv_cli.errors import UnsupportedInputError, UserError


@dataclass(frozen=True)
class ImageGrid:
    """One image's vision tokens inside one prompt row.

    Attributes:
        start: index in the prompt sequence of the image's first vision token.
        length: number of vision tokens of the image (``rows * cols`` plus special tokens).
        rows, cols: the token grid (LLaVA-1.5 at 336 px: 24 × 24).
    """

    start: int
    length: int
    rows: int
    cols: int


@dataclass
class VisionLayout:
    """Where the vision tokens of one prompt row are, and their grid coordinates.

    All tensors are 1-D over the row's ``n`` vision tokens, in sequence order.

    Attributes:
        positions: ``(n,)`` long, index of each vision token in the current sequence.
        coords: ``(n, 2)`` long, the (row, col) of the token on its image's grid; ``(-1, -1)`` for
            special tokens inside a vision run (never merged).
        image: ``(n,)`` long, which image of the prompt the token belongs to (0-based).
        mergeable: ``(n,)`` bool, False for special tokens inside a vision run.
        grids: ``(rows, cols)`` of every image, indexed by ``image``.
    """

    positions: torch.Tensor
    coords: torch.Tensor
    image: torch.Tensor
    mergeable: torch.Tensor
    grids: list[tuple[int, int]]

    @property
    def count(self) -> int:
        """Number of vision tokens ``n`` of the row."""
        return int(self.positions.numel())

    def select(self, keep: torch.Tensor, new_positions: torch.Tensor) -> "VisionLayout":
        """The layout of the surviving vision tokens (``keep``: ``(n,)`` bool) at new positions."""
        return VisionLayout(
            positions=new_positions,
            coords=self.coords[keep],
            image=self.image[keep],
            mergeable=self.mergeable[keep],
            grids=self.grids,
        )


class FamilyAdapter:
    """What lightkv needs to know about one model family. Subclass per family."""

    family: str = ""
    #: whether positions can be renumbered (1-D RoPE); M-RoPE families cannot.
    supports_renumber: bool = True

    def __init__(self, model: nn.Module):
        self.model = model

    # --- structure -------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (has ``.layers``, ``.rotary_emb``, ``.config``)."""
        raise NotImplementedError

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers of the language model."""
        return self.language_model.layers

    @property
    def text_config(self):
        """The language model's config (``num_hidden_layers``, ``num_key_value_heads``, ...)."""
        return self.language_model.config

    @property
    def num_layers(self) -> int:
        """Decoder layers ``L``."""
        return len(self.layers)

    def rotary_function(self, layer_idx: int) -> Callable:
        """The ``apply_rotary_pos_emb(q, k, cos, sin)`` used by the attention of ``layer_idx``."""
        attn = self.layers[layer_idx].self_attn
        fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if fn is None:
            raise UnsupportedInputError(
                f"cannot find apply_rotary_pos_emb for {type(attn).__name__}; this family is not supported"
            )
        return fn

    # --- vision tokens ---------------------------------------------------------------------
    def image_token_id(self) -> int:
        """Id of the placeholder token that marks vision tokens in ``input_ids``."""
        raise NotImplementedError

    def vision_tokens_per_image(self) -> int:
        """Vision tokens one image becomes (fixed-resolution families)."""
        raise NotImplementedError

    def image_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of one image's token grid (fixed-resolution families)."""
        raise NotImplementedError

    def vision_layouts(self, input_ids: torch.Tensor) -> list[VisionLayout]:
        """Locate the vision tokens of every row of ``input_ids`` (``(B, S)`` long).

        Raises:
            UnsupportedInputError: when a vision run is cut (chunked prefill splitting an image).
        """
        raise NotImplementedError

    def format_prompt(self, question: str, num_images: int = 1) -> str:
        """The family's prompt template around a user question with image placeholders."""
        raise NotImplementedError


class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): fixed 336 px input, square CLIP grid.

    Each image becomes ``(image_size // patch_size)²`` placeholder tokens (576 for LLaVA-1.5), laid
    out row-major on a square grid; with ``vision_feature_select_strategy="full"`` the CLS token comes
    first and is kept as a special (never merged) token. Adjacent images form one run of
    placeholders, split into images by the per-image count.
    """

    family = "llava"

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def image_token_id(self) -> int:
        cfg = self.model.config
        tid = getattr(cfg, "image_token_id", None)
        if tid is None:
            tid = cfg.image_token_index
        return int(tid)

    def image_grid(self) -> tuple[int, int]:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def _has_cls(self) -> bool:
        return getattr(self.model.config, "vision_feature_select_strategy", "default") == "full"

    def vision_tokens_per_image(self) -> int:
        rows, cols = self.image_grid()
        return rows * cols + (1 if self._has_cls() else 0)

    def vision_layouts(self, input_ids: torch.Tensor) -> list[VisionLayout]:
        per_image = self.vision_tokens_per_image()
        rows, cols = self.image_grid()
        has_cls = self._has_cls()
        tid = self.image_token_id()
        layouts = []
        for b in range(input_ids.shape[0]):
            is_vis = input_ids[b] == tid
            pos = torch.nonzero(is_vis, as_tuple=False).flatten().cpu()
            n = pos.numel()
            if n % per_image:
                raise UnsupportedInputError(
                    f"row {b} has {n} image placeholder tokens, not a multiple of the {per_image} tokens "
                    "one image becomes: an image is split across forward calls (chunked prefill) or the "
                    "prompt was built for another model; pass the whole prompt in one prefill"
                )
            k = torch.arange(n)
            image = k // per_image
            within = k % per_image
            mergeable = torch.ones(n, dtype=torch.bool)
            if has_cls:
                mergeable = within != 0
                within = (within - 1).clamp(min=0)
            coords = torch.stack([within // cols, within % cols], dim=1)
            coords[~mergeable] = -1
            n_images = n // per_image
            layouts.append(
                VisionLayout(
                    positions=pos,
                    coords=coords,
                    image=image,
                    mergeable=mergeable,
                    grids=[(rows, cols)] * n_images,
                )
            )
        return layouts

    def format_prompt(self, question: str, num_images: int = 1) -> str:
        return "USER: " + "<image>\n" * num_images + question + " ASSISTANT:"


_ADAPTERS: dict[str, type[FamilyAdapter]] = {"llava": LlavaAdapter}


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
