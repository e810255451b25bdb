"""The adapter contract: what a compression method may ask of a model family (the language model, its
layers and rotary function, where the vision tokens of each prompt are and on what grid they lie), and
the helpers the family adapters share.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lightkv_cli.errors import UnsupportedInputError, UserError


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
        grids: ``(rows, cols)`` of every grid, indexed by ``image``. A grid is what is windowed on its
            own: one per LLaVA-1.5 image, two per LLaVA-NeXT image (base and high-resolution), one per
            Qwen2-VL image or video frame.
        owners: for every grid, the visual input of the prompt (image or video, 0-based, in prompt
            order) it belongs to; None means each grid is its own input.
    """

    positions: torch.Tensor
    coords: torch.Tensor
    image: torch.Tensor
    mergeable: torch.Tensor
    grids: list[tuple[int, int]]
    owners: list[int] | None = None

    @property
    def count(self) -> int:
        """Number of vision tokens ``n`` of the row."""
        return int(self.positions.numel())

    @property
    def num_inputs(self) -> int:
        """Visual inputs (images and videos) of the row."""
        if self.owners is None:
            return len(self.grids)
        return (max(self.owners) + 1) if self.owners else 0

    def input_counts(self) -> list[int]:
        """Vision tokens of each visual input (image or video) of the row, special tokens included."""
        owner = torch.arange(len(self.grids)) if self.owners is None else torch.tensor(self.owners, dtype=torch.long)
        per_grid = torch.bincount(self.image.cpu(), minlength=len(self.grids))
        counts = torch.zeros(self.num_inputs, dtype=torch.long)
        if len(self.grids):
            counts.index_add_(0, owner, per_grid[: len(self.grids)])
        return [int(c) for c in counts]

    def select(self, keep: torch.Tensor, new_positions: torch.Tensor) -> VisionLayout:
        """The layout of the surviving vision tokens (``keep``: ``(n,)`` bool) at new positions."""
        return VisionLayout(
            positions=new_positions,
            coords=self.coords[keep],
            image=self.image[keep],
            mergeable=self.mergeable[keep],
            grids=self.grids,
            owners=self.owners,
        )


class FamilyAdapter:
    """What lightkv needs to know about one model family. Subclass per family."""

    family: str = ""
    #: whether positions can be renumbered (1-D RoPE); M-RoPE families cannot.
    supports_renumber: bool = True
    #: whether the family takes video input (``pixel_values_videos``).
    supports_video: bool = False
    #: whether the number of vision tokens per image depends on the image (dynamic resolution).
    dynamic_resolution: bool = False

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
        """The ``apply_rotary_pos_emb(q, k, cos, sin)`` used by the attention of ``layer_idx``.

        ``q``/``k`` are ``(B, H, S, d)``; ``cos``/``sin`` are the ``position_embeddings`` the decoder
        layers receive (``(B, S, d)`` for every supported family).
        """
        attn = self.layers[layer_idx].self_attn
        fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if fn is None:
            raise UnsupportedInputError(
                f"cannot find apply_rotary_pos_emb for {type(attn).__name__}; this family is not supported"
            )
        return fn

    # --- positions -------------------------------------------------------------------------
    @staticmethod
    def gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Position ids at the kept sequence indices.

        Args:
            position_ids: ``(B|1, S)`` or ``(k, B|1, S)`` (multi-axis positions such as M-RoPE's).
            index: ``(B, S')`` long, kept indices per row.

        Returns:
            ``(B, S')`` or ``(k, B, S')``.
        """
        B = index.shape[0]
        if position_ids.ndim == 2:
            return position_ids.expand(B, -1).gather(1, index)
        k = position_ids.shape[0]
        return position_ids.expand(k, B, -1).gather(2, index.unsqueeze(0).expand(k, -1, -1))

    @staticmethod
    def gather_position_embeddings(
        position_embeddings: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` at the kept sequence indices.

        Args:
            position_embeddings: ``cos, sin`` each ``(B|1, S, d)``, or ``(k, B|1, S, d)`` when a
                family keeps one table per position axis.
            index: ``(B, S')`` long, kept indices per row.

        Returns:
            ``(cos, sin)`` each ``(B, S', d)`` (or ``(k, B, S', d)``).
        """
        B = index.shape[0]
        out = []
        for t in position_embeddings:
            d = t.shape[-1]
            if t.ndim == 3:
                out.append(t.expand(B, -1, -1).gather(1, index.unsqueeze(-1).expand(-1, -1, d)))
            else:
                k = t.shape[0]
                gidx = index.unsqueeze(0).unsqueeze(-1).expand(k, -1, -1, d)
                out.append(t.expand(k, B, -1, -1).gather(2, gidx))
        return out[0], out[1]

    def prefill_position_ids(self, inputs: Mapping[str, torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids of a prompt, as ``generate()`` would compute them.

        Args:
            inputs: processor output (``input_ids`` ``(B, S)``, ...).
            attention_mask: ``(B, S)`` 1 for real tokens, 0 for (left) padding.

        Returns:
            ``(B, S)`` long for 1-D RoPE families (``(k, B, S)`` for multi-axis ones).
        """
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def next_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Position ids of the first generated token after a prompt with ``position_ids``.

        Returns:
            ``(B, 1)`` (or ``(k, B, 1)``); later tokens add 1 per step.
        """
        return position_ids[..., -1:] + 1

    # --- vision tokens ---------------------------------------------------------------------
    def image_token_id(self) -> int:
        """Id of the placeholder token that marks image tokens in ``input_ids``."""
        raise NotImplementedError

    def vision_token_ids(self) -> list[int]:
        """Ids of every placeholder token that marks vision tokens (images, video frames)."""
        return [self.image_token_id()]

    def vision_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` bool, True at vision placeholder tokens (images and video frames, special tokens
        inside a vision run included). Needs only the ids: for methods that do not window on grids."""
        return torch.isin(input_ids, torch.tensor(self.vision_token_ids(), device=input_ids.device))

    def vision_tokens_per_image(self) -> int:
        """Vision tokens one image becomes (for dynamic-resolution families: a representative image,
        see :meth:`prediction_grids`)."""
        grids, special = self.prediction_grids()
        return sum(r * c for r, c in grids) + special

    def image_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of one image's (first) token grid (representative for dynamic families)."""
        return self.prediction_grids()[0][0]

    def prediction_grids(self) -> tuple[list[tuple[int, int]], int]:
        """The grids of one representative image and its never-merged special tokens.

        Used to predict a schedule's retention before any input is seen (``LightKV.for_retention``);
        the measured retention is always read from the cache.

        Returns:
            ``(grids, special)``: ``[(rows, cols), ...]`` and the number of special tokens.
        """
        raise NotImplementedError

    def check_prompt(self, input_ids: torch.Tensor) -> None:
        """Fail early, before the vision tower runs, on prompts whose vision runs are visibly cut.

        Raises:
            UnsupportedInputError: a vision run that cannot be a whole image (chunked prefill).
        """

    def vision_layouts(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> list[VisionLayout]:
        """Locate the vision tokens of every row and their grid coordinates.

        Called with what the language model receives during prefill.

        Args:
            input_ids: ``(B, S)`` long.
            inputs_embeds: ``(B, S, D)`` the embeddings entering the decoder (vision features in
                place), for families whose grid shows only there (LLaVA-NeXT's newline tokens).
            position_ids: the position ids entering the decoder (``(3|4, B, S)`` for M-RoPE).

        Raises:
            UnsupportedInputError: when a vision run is cut (chunked prefill splitting an image), or
                what the family needs to recover the grid is missing.
        """
        raise NotImplementedError

    def format_prompt(self, question: str, num_images: int = 1, num_videos: int = 0) -> str:
        """The family's prompt template around a user question with image (and video) placeholders.

        Raises:
            UserError: ``num_videos > 0`` for a family without video input.
        """
        raise NotImplementedError

    def format_followup(self, question: str) -> str:
        """The family's next user turn and generation prompt, as it follows an answer's end-of-sequence
        token: what a follow-up question about the same image appends to the conversation."""
        raise NotImplementedError

    def _no_video(self, num_videos: int) -> None:
        if num_videos:
            raise UserError(
                f"the {self.family} family takes no video input; use a Qwen2-VL or Qwen2.5-VL model "
                "(e.g. --model tiny-qwen2-vl) for video"
            )


def mask_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the contiguous True runs of a 1-D bool tensor (end exclusive)."""
    idx = torch.nonzero(mask, as_tuple=False).flatten().tolist()
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def cut_image_error(row: int, qwen: bool = False) -> UnsupportedInputError:
    what = (
        "the image grid recovered from the M-RoPE positions is not a full rectangle"
        if qwen
        else ("an image's base grid or newline-terminated rows are incomplete")
    )
    return UnsupportedInputError(
        f"row {row}: {what}: an image is split across forward calls (chunked prefill) or the prompt was "
        "built for another model; pass the whole prompt in one prefill"
    )


def empty_layout() -> VisionLayout:
    return VisionLayout(
        positions=torch.zeros(0, dtype=torch.long),
        coords=torch.zeros(0, 2, dtype=torch.long),
        image=torch.zeros(0, dtype=torch.long),
        mergeable=torch.zeros(0, dtype=torch.bool),
        grids=[],
        owners=[],
    )
