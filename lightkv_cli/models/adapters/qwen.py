"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, one ``t·h × w`` grid per image or video frame group (after
the 2×2 merge), read from the 3-D M-RoPE position ids.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import torch
from torch import nn

from lightkv_cli.errors import UnsupportedInputError
from lightkv_cli.models.adapters.base import FamilyAdapter, VisionLayout, cut_image_error, empty_layout, mask_runs


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
                layouts.append(empty_layout())
                continue
            thw = position_ids[-3:, b if position_ids.shape[1] > 1 else 0].cpu().long()
            positions, coords, image, grids, owners = [], [], [], [], []
            for token, is_video in ((image_id, False), (video_id, True)):
                for start, end in mask_runs(ids == token):
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
                            raise cut_image_error(b, qwen=True)
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

    def format_followup(self, question: str) -> str:
        # after the answer's <|im_end|> (its end-of-sequence token)
        return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


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
