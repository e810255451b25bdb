"""LLaVA-1.5 (one square grid per image) and LLaVA-NeXT (a base grid plus a high-resolution grid with a
newline column, recovered from the newline embeddings the decoder receives).
"""

from __future__ import annotations

import torch
from torch import nn

from lightkv_cli.errors import UnsupportedInputError
from lightkv_cli.models.adapters.base import FamilyAdapter, VisionLayout, cut_image_error, empty_layout, mask_runs


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
        # every image has a fixed token count: checkable from the ids (one host read for the batch)
        self._checked = (input_ids, self._row_counts(input_ids))

    def _row_counts(self, input_ids: torch.Tensor) -> list[int]:
        """Image placeholder tokens of every row (one host read; reused after :meth:`check_prompt` of
        the same ids); raises on a partial image."""
        checked = getattr(self, "_checked", None)
        if checked is not None and checked[0] is input_ids:
            return checked[1]
        per_image = self.vision_tokens_per_image()
        counts = (input_ids == self.image_token_id()).sum(dim=1).tolist()
        for b, n in enumerate(counts):
            if n % per_image:
                raise UnsupportedInputError(
                    f"row {b} has {n} image placeholder tokens, not a multiple of the {per_image} tokens "
                    "one image becomes: an image is split across forward calls (chunked prefill) or the "
                    "prompt was built for another model; pass the whole prompt in one prefill"
                )
        return counts

    def vision_layouts(self, input_ids, inputs_embeds=None, position_ids=None) -> list[VisionLayout]:
        """One :class:`VisionLayout` per row (see :meth:`FamilyAdapter.vision_layouts`).

        Two host reads for the whole batch (the rows' counts, then every placeholder position); the
        grid facts of ``k`` images are the same for every row with ``k`` images and are built once.
        """
        per_image = self.vision_tokens_per_image()
        rows, cols = self.image_grid()
        has_cls = self._has_cls()
        counts = self._row_counts(input_ids)
        flat = torch.nonzero(input_ids == self.image_token_id(), as_tuple=False)[:, 1].cpu()
        shared: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        layouts = []
        start = 0
        for n in counts:
            if n not in shared:
                k = torch.arange(n)
                image = k // per_image
                within = k % per_image
                mergeable = torch.ones(n, dtype=torch.bool)
                if has_cls:
                    mergeable = within != 0
                    within = (within - 1).clamp(min=0)
                coords = torch.stack([within // cols, within % cols], dim=1)
                coords.masked_fill_((~mergeable).unsqueeze(1), -1)  # host tensors; no index_put (an item read)
                shared[n] = (coords, image, mergeable)
            coords, image, mergeable = shared[n]
            layouts.append(
                VisionLayout(
                    positions=flat[start : start + n],
                    coords=coords,
                    image=image,
                    mergeable=mergeable,
                    grids=[(rows, cols)] * (n // per_image),
                )
            )
            start += n
        return layouts

    def format_prompt(self, question: str, num_images: int = 1, num_videos: int = 0) -> str:
        self._no_video(num_videos)
        return "USER: " + "<image>\n" * num_images + question + " ASSISTANT:"

    def format_followup(self, question: str) -> str:
        return "USER: " + question + " ASSISTANT:"


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
                layouts.append(empty_layout())
                continue
            newline = (inputs_embeds[b] == self._newline().to(inputs_embeds.dtype)).all(dim=-1).cpu() & is_vis
            positions, coords, image, mergeable, grids, owners = [], [], [], [], [], []
            for start, end in mask_runs(is_vis):
                p = start
                while p < end:
                    img = (max(owners) + 1) if owners else 0
                    base_end = p + base_len
                    if base_end > end or bool(newline[p:base_end].any()):
                        raise cut_image_error(b)
                    nl = torch.nonzero(newline[base_end:end], as_tuple=False).flatten()
                    if nl.numel() == 0:
                        raise cut_image_error(b)
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
                    c.masked_fill_(is_nl.unsqueeze(1), -1)
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

    def format_followup(self, question: str) -> str:
        if getattr(self.text_config, "model_type", "") == "mistral":
            return "[INST] " + question + " [/INST]"
        return "USER: " + question + " ASSISTANT:"
