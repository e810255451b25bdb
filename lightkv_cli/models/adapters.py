"""Family adapters: the model-specific facts a compression method needs, and nothing else.

A compressor never looks at a model class directly. It asks the adapter for the language model
(``.layers``, ``.rotary_emb``, its config), where the vision tokens of each prompt are and on what
grid they lie, and which rotary function the attention uses. Adding a family (LLaVA-NeXT,
Qwen2-VL, ...) means adding an adapter here, not touching the methods.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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

    def _no_video(self, num_videos: int) -> None:
        if num_videos:
            raise UserError(
                f"the {self.family} family takes no video input; use a Qwen2-VL or Qwen2.5-VL model "
                "(e.g. --model tiny-qwen2-vl) for video"
            )


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the contiguous True runs of a 1-D bool tensor (end exclusive)."""
    idx = torch.nonzero(mask, as_tuple=False).flatten().tolist()
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


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

    def _side(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def image_grid(self) -> tuple[int, int]:
        side = self._side()
        return side, side

    def _has_cls(self) -> bool:
        return getattr(self.model.config, "vision_feature_select_strategy", "default") == "full"

    def prediction_grids(self) -> tuple[list[tuple[int, int]], int]:
        return [self.image_grid()], (1 if self._has_cls() else 0)

    def vision_tokens_per_image(self) -> int:
        rows, cols = self.image_grid()
        return rows * cols + (1 if self._has_cls() else 0)

    def check_prompt(self, input_ids: torch.Tensor) -> None:
        self.vision_layouts(input_ids)  # every image has a fixed token count: checkable from the ids

    def vision_layouts(self, input_ids, inputs_embeds=None, position_ids=None) -> list[VisionLayout]:
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

    def format_prompt(self, question: str, num_images: int = 1, num_videos: int = 0) -> str:
        self._no_video(num_videos)
        return "USER: " + "<image>\n" * num_images + question + " ASSISTANT:"


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): "anyres" images.

    Each image becomes a base grid (the whole image at the vision tower's resolution,
    ``side × side`` with ``side = image_size // patch_size``) followed by a high-resolution grid of
    ``rows × (cols + 1)`` tokens: the image tiled at the best-fitting ``image_grid_pinpoints``
    resolution, unpadded to the image's aspect ratio, with one newline token (the learned
    ``image_newline`` embedding) closing every row. The two grids are windowed separately on their
    true shapes; newline tokens are special (never merged).

    ``generate()`` hides ``image_sizes`` from later forwards, so the high-resolution grid is recovered
    from what the decoder receives: the positions of the newline embeddings in ``inputs_embeds``.
    """

    family = "llava_next"
    dynamic_resolution = True

    def check_prompt(self, input_ids: torch.Tensor) -> None:
        """Nothing to check from the ids alone: an image's token count depends on its size."""

    def _newline(self) -> torch.Tensor:
        return self.model.model.image_newline

    def prediction_grids(self) -> tuple[list[tuple[int, int]], int]:
        """Base grid plus the high-resolution grid of a square image at the largest square pinpoint
        (2×2 tiles for LLaVA-NeXT-7B: 24×24 + 48×48 + 48 newlines = 2928 tokens)."""
        side = self._side()
        vc = self.model.config.vision_config
        pins = getattr(self.model.config, "image_grid_pinpoints", None) or [[vc.image_size, vc.image_size]]
        square = [h for h, w in pins if h == w] or [min(min(h, w) for h, w in pins)]
        tiles = max(1, max(square) // vc.image_size)
        hi = side * tiles
        return [(side, side), (hi, hi)], hi + (1 if self._has_cls() else 0)

    def vision_tokens_per_image(self) -> int:
        grids, special = self.prediction_grids()
        return sum(r * c for r, c in grids) + special

    def vision_layouts(self, input_ids, inputs_embeds=None, position_ids=None) -> list[VisionLayout]:
        if self._has_cls():
            raise UnsupportedInputError(
                "LLaVA-NeXT with vision_feature_select_strategy='full' is not supported; use 'default'"
            )
        tid = self.image_token_id()
        has_vision = bool((input_ids == tid).any())
        if has_vision and inputs_embeds is None:
            raise UnsupportedInputError(
                "LLaVA-NeXT needs the decoder's input embeddings to find the image grids (newline tokens)"
            )
        side = self._side()
        base_len = side * side
        layouts = []
        for b in range(input_ids.shape[0]):
            is_vis = (input_ids[b] == tid).cpu()
            if not bool(is_vis.any()):
                layouts.append(_empty_layout())
                continue
            newline = (inputs_embeds[b] == self._newline().to(inputs_embeds.dtype)).all(dim=-1).cpu() & is_vis
            positions, coords, image, mergeable, grids, owners = [], [], [], [], [], []
            for start, end in _runs(is_vis):
                p = start
                while p < end:
                    img = (max(owners) + 1) if owners else 0
                    base_end = p + base_len
                    if base_end > end or bool(newline[p:base_end].any()):
                        raise _cut_image(b)
                    nl = torch.nonzero(newline[base_end:end], as_tuple=False).flatten()
                    if nl.numel() == 0:
                        raise _cut_image(b)
                    cols = int(nl[0])
                    # base grid
                    k = torch.arange(base_len)
                    positions.append(torch.arange(p, base_end))
                    coords.append(torch.stack([k // side, k % side], 1))
                    image.append(torch.full((base_len,), len(grids), dtype=torch.long))
                    mergeable.append(torch.ones(base_len, dtype=torch.bool))
                    grids.append((side, side))
                    owners.append(img)
                    q = base_end
                    if cols == 0:  # a single tile: the base grid is followed by one newline
                        rows, q_end = 0, q + 1
                    else:
                        rows = 0
                        while q + (rows + 1) * (cols + 1) <= end:
                            row_start = q + rows * (cols + 1)
                            if not bool(newline[row_start + cols]) or bool(newline[row_start : row_start + cols].any()):
                                break
                            rows += 1
                        q_end = q + rows * (cols + 1)
                    n_hi = q_end - q
                    k = torch.arange(n_hi)
                    width = cols + 1
                    c = torch.stack([k // width, k % width], 1) if rows else torch.full((n_hi, 2), -1)
                    is_nl = newline[q:q_end].clone()
                    c[is_nl] = -1
                    positions.append(torch.arange(q, q_end))
                    coords.append(c)
                    image.append(torch.full((n_hi,), len(grids), dtype=torch.long))
                    mergeable.append(~is_nl)
                    grids.append((max(rows, 1), max(cols, 1)))
                    owners.append(img)
                    p = q_end
            layouts.append(
                VisionLayout(
                    positions=torch.cat(positions),
                    coords=torch.cat(coords).long(),
                    image=torch.cat(image),
                    mergeable=torch.cat(mergeable),
                    grids=grids,
                    owners=owners,
                )
            )
        return layouts

    def format_prompt(self, question: str, num_images: int = 1, num_videos: int = 0) -> str:
        self._no_video(num_videos)
        if getattr(self.text_config, "model_type", "") == "mistral":
            return "[INST] " + "<image>\n" * num_images + question + " [/INST]"
        return "USER: " + "<image>\n" * num_images + question + " ASSISTANT:"


class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``): dynamic resolution, M-RoPE positions.

    An image of ``H × W`` pixels (resized to multiples of 28) becomes ``(H/28) × (W/28)`` tokens after
    the vision tower's 2×2 merge, laid out row-major; a video of ``F`` frames becomes
    ``⌈F/2⌉`` frame groups of one such grid each. Every token's language-model position is a
    (t, h, w) triple (M-RoPE); the grid of each image or frame is read from the ``(3, B, S)``
    position ids that reach the decoder (a leading text-position row, ``(4, B, S)``, is dropped), so
    it is known during ``generate()`` too. Each image, and each frame of a video, is windowed on its
    own grid. Positions cannot be renumbered (there is no 1-D order to renumber).
    """

    family = "qwen2_vl"
    supports_renumber = False
    supports_video = True
    dynamic_resolution = True
    #: representative image for schedule prediction: 448 × 448 px → 16 × 16 tokens.
    REPRESENTATIVE_GRID = (16, 16)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def video_token_id(self) -> int:
        """Id of the placeholder token of video frames."""
        return int(self.model.config.video_token_id)

    def vision_token_ids(self) -> list[int]:
        return [self.image_token_id(), self.video_token_id()]

    def prediction_grids(self) -> tuple[list[tuple[int, int]], int]:
        return [self.REPRESENTATIVE_GRID], 0

    def rotary_function(self, layer_idx: int) -> Callable:
        """Qwen's decoder layers receive ``cos, sin`` already combined over the three M-RoPE axes
        (``(B, S, d)``), so the plain rotation applies; older layouts that keep the axes apart
        (``(3, B, S, d)``) are combined with the config's ``mrope_section``."""
        attn = self.layers[layer_idx].self_attn
        module = sys.modules[type(attn).__module__]
        plain = getattr(module, "apply_rotary_pos_emb", None)
        multi = getattr(module, "apply_multimodal_rotary_pos_emb", None)
        section = (getattr(self.text_config, "rope_parameters", None) or {}).get("mrope_section")
        if section is None:
            section = (getattr(self.text_config, "rope_scaling", None) or {}).get("mrope_section")

        def rotate(q, k, cos, sin):
            if cos.ndim == 4:
                if multi is None:
                    raise UnsupportedInputError("per-axis M-RoPE tables without apply_multimodal_rotary_pos_emb")
                return multi(q, k, cos, sin, section)
            if plain is None:
                raise UnsupportedInputError(f"cannot find apply_rotary_pos_emb for {type(attn).__name__}")
            return plain(q, k, cos, sin)

        return rotate

    def _rope_index_kwargs(self, inputs: Mapping[str, torch.Tensor]) -> dict:
        kw = {}
        for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
            if inputs.get(key) is not None:
                kw[key] = inputs[key]
        return kw

    def prefill_position_ids(self, inputs, attention_mask) -> torch.Tensor:
        """``(3, B, S)`` M-RoPE positions from the model's own ``get_rope_index`` (as ``generate()``)."""
        ids = inputs["input_ids"]
        tt = inputs.get("mm_token_type_ids")
        if tt is None:
            tt = torch.zeros_like(ids)
            tt[ids == self.image_token_id()] = 1
            tt[ids == self.video_token_id()] = 2
        kw = self._rope_index_kwargs(inputs)
        if not kw:
            return super().prefill_position_ids(inputs, attention_mask).unsqueeze(0).expand(3, -1, -1)
        pos, _deltas = self.model.model.get_rope_index(ids, mm_token_type_ids=tt, attention_mask=attention_mask, **kw)
        return pos

    def next_position_ids(self, position_ids) -> torch.Tensor:
        """Every axis continues from the largest position of the prompt plus one (M-RoPE)."""
        if position_ids.ndim == 2:
            return super().next_position_ids(position_ids)
        nxt = position_ids.amax(dim=(0, 2)).view(1, -1, 1) + 1
        return nxt.expand(position_ids.shape[0], -1, -1).clone()

    def vision_layouts(self, input_ids, inputs_embeds=None, position_ids=None) -> list[VisionLayout]:
        image_id, video_id = self.image_token_id(), self.video_token_id()
        has_vision = bool(((input_ids == image_id) | (input_ids == video_id)).any())
        if has_vision and (position_ids is None or position_ids.ndim != 3 or position_ids.shape[0] not in (3, 4)):
            raise UnsupportedInputError(
                f"{type(self.model).__name__} needs the 3-D M-RoPE position ids to find the image grids; pass "
                "image_grid_thw/video_grid_thw and mm_token_type_ids as the processor returns them, and no "
                "1-D position_ids"
            )
        layouts = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b].cpu()
            if not bool(((ids == image_id) | (ids == video_id)).any()):
                layouts.append(_empty_layout())
                continue
            thw = position_ids[-3:, b if position_ids.shape[1] > 1 else 0].cpu().long()
            positions, coords, image, grids, owners = [], [], [], [], []
            for token, is_video in ((image_id, False), (video_id, True)):
                for start, end in _runs(ids == token):
                    pieces = _split_frames(thw[:, start:end])
                    video_owner = None
                    for a, z in pieces:
                        t, h, w = (
                            thw[0, start + a : start + z],
                            thw[1, start + a : start + z],
                            thw[2, start + a : start + z],
                        )
                        rows = h - h.min()
                        cols = w - w.min()
                        R, C = int(rows.max()) + 1, int(cols.max()) + 1
                        n = z - a
                        expect = torch.arange(n)
                        if n != R * C or not torch.equal(rows * C + cols, expect) or bool((t != t[0]).any()):
                            raise _cut_image(b, qwen=True)
                        positions.append(torch.arange(start + a, start + z))
                        coords.append(torch.stack([rows, cols], 1))
                        image.append(torch.full((n,), len(grids), dtype=torch.long))
                        grids.append((R, C))
                        if is_video:
                            if video_owner is None:
                                video_owner = (max(owners) + 1) if owners else 0
                            owners.append(video_owner)
                        else:
                            owners.append((max(owners) + 1) if owners else 0)
            # images and videos in sequence order
            order = sorted(range(len(grids)), key=lambda g: int(positions[g][0]))
            remap_grid = {old: new for new, old in enumerate(order)}
            first_seen: dict[int, int] = {}
            for g in order:
                first_seen.setdefault(owners[g], len(first_seen))
            pos = torch.cat([positions[g] for g in order])
            layouts.append(
                VisionLayout(
                    positions=pos,
                    coords=torch.cat([coords[g] for g in order]).long(),
                    image=torch.cat([torch.full_like(image[g], remap_grid[g]) for g in order]),
                    mergeable=torch.ones(pos.numel(), dtype=torch.bool),
                    grids=[grids[g] for g in order],
                    owners=[first_seen[owners[g]] for g in order],
                )
            )
        return layouts

    def format_prompt(self, question: str, num_images: int = 1, num_videos: int = 0) -> str:
        vision = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
        vision += "<|vision_start|><|video_pad|><|vision_end|>" * num_videos
        return (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"
        )


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): as Qwen2-VL for the decoder (M-RoPE,
    dynamic resolution, 2×2 merge); video frame groups are spaced in time by
    ``tokens_per_second · second_per_grid_ts`` position steps, which the frame split handles."""

    family = "qwen2_5_vl"


def _split_frames(thw: torch.Tensor) -> list[tuple[int, int]]:
    """Split one run of vision tokens (``(3, n)`` t/h/w positions) into images or frames.

    A new piece starts where the temporal position changes, or, inside a stretch of equal temporal
    positions (frames that share one), where the (h, w) position is the stretch's top-left corner
    (every image or frame starts there: M-RoPE offsets h and w by the same start for all its frames).
    """
    n = thw.shape[1]
    t, h, w = thw[0], thw[1], thw[2]
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = t[1:] != t[:-1]
    starts = torch.nonzero(change, as_tuple=False).flatten().tolist()
    cuts = set(starts)
    for a, z in zip(starts, starts[1:] + [n]):
        hs, ws = h[a:z], w[a:z]
        corner = torch.nonzero((hs == hs.min()) & (ws == ws.min()), as_tuple=False).flatten() + a
        cuts.update(corner.tolist())
    cuts = sorted(cuts) + [n]
    return list(zip(cuts[:-1], cuts[1:]))


def _cut_image(row: int, qwen: bool = False) -> UnsupportedInputError:
    what = (
        "the image grid recovered from the M-RoPE positions is not a full rectangle"
        if qwen
        else ("an image's base grid or newline-terminated rows are incomplete")
    )
    return UnsupportedInputError(
        f"row {row}: {what}: an image is split across forward calls (chunked prefill) or the prompt was "
        "built for another model; pass the whole prompt in one prefill"
    )


def _empty_layout() -> VisionLayout:
    return VisionLayout(
        positions=torch.zeros(0, dtype=torch.long),
        coords=torch.zeros(0, 2, dtype=torch.long),
        image=torch.zeros(0, dtype=torch.long),
        mergeable=torch.zeros(0, dtype=torch.bool),
        grids=[],
        owners=[],
    )


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
