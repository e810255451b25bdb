"""VisionZip: keep the vision tokens the [CLS] token attends most, merge the rest into a few, before the decoder.

Implements "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (Yang et al., CVPR
2025, arXiv 2412.04467) from its definition in ``shared/docs/METHODS.md`` §5.1, not from the authors' code
(which patches CLIP's attention with an old signature, forces eager attention with ``output_attentions``
in every ViT layer and runs at batch 1; none of that is reproduced).

At the vision tower layer whose output LLaVA projects (``vision_feature_layer``: ViT layer 22 of 24 for
LLaVA-1.5), two hooks capture, per image, the [CLS] query's attention row over the image's tokens
(``a = Σ_h softmax(q_cls·Kᵀ·d^-½)``, float32, one query row: never an ``N×N`` matrix; SDPA stays on in
the tower), the keys averaged over heads ``M`` and the layer's output ``X``. Before decoder layer 0 (the
:class:`~lightkv_cli.methods.prellm.InputPress` machinery), each image keeps

- **dominant** tokens: the ``D`` patches with the largest ``a``, their own embeddings;
- **contextual** tokens: the other patches in index order, ``C`` uniformly spaced targets among them
  (``step = max(1, ⌊|rest|/C⌋)``), every remaining patch assigned to its most similar target by
  ``cos(M_i, M_t)``; target ``t`` becomes ``X_t + mean_{i→t} X_i`` (the published target **plus** mean),
  passed through the model's projector, at the target's sequence slot and position.

``D + C = round(R·m)`` split as the published 54 + 10 (``C = round(k·10/64)``); the published 64-token
setting keeps ``R = 0.111`` of LLaVA-1.5's 576. With ``vision_feature_select_strategy="default"`` (HF's
LLaVA-1.5) the [CLS] token is not among the decoder's vision tokens, so all ``D`` dominant tokens are
patches (the authors count [CLS] as one of them); with ``"full"`` the [CLS] token is kept as a special
token.

Defined for LLaVA-1.5 (a CLIP-style tower with a [CLS] token, one grid per image). Refused, one line each:
LLaVA-NeXT (its crops reach the decoder unpadded and reordered; the crop → token map is not implemented),
Qwen2-VL / Qwen2.5-VL (no [CLS] token; the paper's mean-attention variant is not implemented), a list of
feature layers, and feature layer 0 (the embeddings, before any attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightkv_cli.errors import UnsupportedInputError
from lightkv_cli.measure.timing import profile_range
from lightkv_cli.methods.prellm import InputPress, InputSlot, check_share, rounded_count
from lightkv_cli.methods.vision import compact
from lightkv_cli.models.adapters import FamilyAdapter, adapter_for

#: The published split of kept tokens: 54 dominant + 10 contextual of 64 (also 108 + 20, 162 + 30).
CONTEXTUAL_SHARE = 10 / 64


def split_counts(k: int) -> tuple[int, int]:
    """``(dominant D, contextual C)`` for ``k`` kept tokens: ``C = round(k·10/64)`` (0 when ``k < 2``)."""
    contextual = 0 if k < 2 else min(k - 1, max(1, round(k * CONTEXTUAL_SHARE)))
    return k - contextual, contextual


def vision_layer(model: nn.Module) -> tuple[nn.Module, int]:
    """The tower layer whose output LLaVA projects, and its index.

    Raises:
        UnsupportedInputError: the family is not LLaVA-1.5, several feature layers, or layer 0.
    """
    adapter = adapter_for(model)
    if adapter.family != "llava":
        why = (
            "its crops reach the decoder unpadded and reordered (the crop → token map is not implemented)"
            if adapter.family == "llava_next"
            else "its vision tower has no [CLS] token (the paper's mean-attention variant is not implemented)"
        )
        raise UnsupportedInputError(f"visionzip is defined here for LLaVA-1.5 only; {adapter.family}: {why}")
    cfg = model.config
    fl = getattr(cfg, "vision_feature_layer", -2)
    if not isinstance(fl, int):
        raise UnsupportedInputError("visionzip needs one vision_feature_layer; this model concatenates several")
    tower = getattr(model, "model", model).vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers  # transformers before and after 5.2x
    index = len(layers) + fl if fl < 0 else fl - 1
    if not (0 <= index < len(layers)):
        raise UnsupportedInputError(f"visionzip needs a vision feature layer after attention, got {fl}")
    return layers[index], index


@dataclass
class VisionZip(InputPress):
    """VisionZip (arXiv 2412.04467): per image, ``D`` dominant tokens by [CLS] attention and ``C``
    merged contextual tokens, before decoder layer 0 (module docstring).

    Args:
        ratio: ``R``, the share of each image's patches kept (``D + C = round(R·m)``), in ``(0, 1]``; the
            published 64 tokens of 576 is 0.111; 1 keeps everything (bit-identical).
        positions: ``"keep"`` (default: kept tokens keep their positions, a contextual token its target's)
            or ``"renumber"`` (contiguous positions, as the published LLaVA code).

    Attributes:
        expected_retention: predicted average vision retention (:meth:`predict`, :meth:`for_retention`).
        schedule_note: how :meth:`for_retention` chose the split.

    Raises:
        UserError: ``ratio`` outside ``(0, 1]`` or an unknown ``positions``.
        UnsupportedInputError: (on attaching) a family or feature layer it is not defined for
            (:func:`vision_layer`).
    """

    ratio: float = 64 / 576
    positions: str = "keep"
    expected_retention: float | None = field(default=None, compare=False)
    schedule_note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.ratio = self._checked(self.ratio, "VisionZip ratio")

    def describe(self) -> dict:
        """Parameters for results files."""
        return {"ratio": round(self.ratio, 6), "positions": self.positions, "schedule_note": self.schedule_note}

    def kept_count(self, m: int, grids: Sequence[tuple[int, int]] = (), special: int = 0) -> int:
        """``round(R·(m + special)) − special``, at least 1 (:func:`~lightkv_cli.methods.prellm.rounded_count`)."""
        return rounded_count(self.ratio, m, special)

    # --- capture in the vision tower ---------------------------------------------------------
    def _register(self, model: nn.Module, adapter: FamilyAdapter) -> list[Any]:
        layer, _ = vision_layer(model)
        self._projector = getattr(model, "model", model).multi_modal_projector
        self._captured: dict[str, torch.Tensor] = {}
        handles = super()._register(model, adapter)
        return [
            *handles,
            layer.self_attn.register_forward_pre_hook(self._attn_pre_hook, with_kwargs=True),
            layer.register_forward_hook(self._layer_hook),
        ]

    # The tower runs only when there are pixels (a prefill); with ``generate()`` it may run before the top
    # model's pre-hook marks the prefill, so the capture does not look at the phase: the prefill consumes it.
    def _attn_pre_hook(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)  # (items, 1 + P, width), post-LayerNorm
        items, N, _ = x.shape
        H, d = module.num_heads, module.head_dim
        with profile_range("lightkv::visionzip_cls"):
            q = module.q_proj(x[:, :1]).float().view(items, 1, H, d).transpose(1, 2)  # (items, H, 1, d)
            k = module.k_proj(x).float().view(items, N, H, d).transpose(1, 2)  # (items, H, N, d)
            probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * module.scale, dim=-1)  # (items, H, 1, N)
            self._captured["cls"] = probs.sum(dim=1)[:, 0, 1:]  # (items, P)
            self._captured["keys"] = k.mean(dim=1)  # (items, N, d)
        return None

    def _layer_hook(self, module, args, output):
        self._captured["x"] = output[0] if isinstance(output, tuple) else output  # (items, 1 + P, width)

    def _prefill(self, args: tuple, kwargs: dict):
        try:
            return super()._prefill(args, kwargs)
        finally:
            self._captured = {}

    def _detach(self) -> None:
        super()._detach()
        self._captured = {}

    # --- the selection ---------------------------------------------------------------------
    def choose(self, features: torch.Tensor, k: int, slot: InputSlot) -> tuple[torch.Tensor, torch.Tensor]:
        """Dominant and contextual tokens of one image in every row (module docstring).

        Returns:
            ``(B, k)`` indices into the image's ``m`` patches (ascending) and their ``(B, k, D)``
            embeddings: the dominant tokens' own, the contextual tokens' projected merges.

        Raises:
            UnsupportedInputError: the vision tower did not run in this prefill (no image features captured).
        """
        cap = self._captured
        if "cls" not in cap or "x" not in cap:
            raise UnsupportedInputError("visionzip needs the vision tower to run in the same forward as the prefill")
        B, m, width = features.shape
        device = features.device
        ((_, cols),) = slot.grids
        patch = (slot.coords[:, 0] * cols + slot.coords[:, 1]).to(device)  # (m,) patch index in the tower
        items = (torch.arange(B) * slot.inputs + slot.input).to(device)  # (B,) this image's tower rows
        scores = cap["cls"].index_select(0, items)[:, patch]  # (B, m)
        dominant, contextual = split_counts(k)
        dom = scores.topk(dominant, dim=1).indices  # (B, D) into m
        picked = torch.zeros(B, m, dtype=torch.bool, device=device).scatter_(1, dom, True)
        parts_idx, parts_val = [dom], [features.gather(1, dom.unsqueeze(-1).expand(-1, -1, width))]
        if contextual:
            rest = compact(~picked, m - dominant)  # (B, m − D) ascending
            n_rest = m - dominant
            step = max(1, n_rest // contextual)
            targets = rest[:, torch.arange(0, n_rest, step, device=device)[:contextual]]  # (B, C)
            is_target = torch.zeros(B, m, dtype=torch.bool, device=device).scatter_(1, targets, True)
            others = compact(~(picked | is_target), n_rest - contextual)  # (B, m − D − C)
            keys = F.normalize(cap["keys"].index_select(0, items)[:, 1:][:, patch], dim=-1)  # (B, m, d)
            x = cap["x"].index_select(0, items)[:, 1:][:, patch].float()  # (B, m, width_v)
            kd = keys.shape[-1]
            t_keys = keys.gather(1, targets.unsqueeze(-1).expand(-1, -1, kd))
            o_keys = keys.gather(1, others.unsqueeze(-1).expand(-1, -1, kd))
            assign = torch.matmul(o_keys, t_keys.transpose(1, 2)).argmax(dim=-1)  # (B, m − D − C) into C
            wv = x.shape[-1]
            sums = torch.zeros(B, contextual, wv, device=device).scatter_add_(
                1, assign.unsqueeze(-1).expand(-1, -1, wv), x.gather(1, others.unsqueeze(-1).expand(-1, -1, wv))
            )
            counts = torch.zeros(B, contextual, device=device).scatter_add_(
                1, assign, torch.ones(assign.shape, device=device)
            )
            merged = x.gather(1, targets.unsqueeze(-1).expand(-1, -1, wv)) + sums / counts.clamp(min=1).unsqueeze(-1)
            proj_dtype = next(self._projector.parameters()).dtype
            parts_idx.append(targets)
            parts_val.append(self._projector(merged.to(proj_dtype)).to(features.dtype))
        chosen = torch.cat(parts_idx, dim=1)
        order = chosen.argsort(dim=1)
        values = torch.cat(parts_val, dim=1)
        return chosen.gather(1, order), values.gather(1, order.unsqueeze(-1).expand(-1, -1, width))

    @classmethod
    def for_retention(cls, retention: float, model: nn.Module, positions: str = "keep") -> VisionZip:
        """VisionZip keeping the share ``retention`` of each image (``D + C = round(R·m)``, split 54:10).

        On a family it is not defined for, the press is built (its ``schedule_note`` says why) and refuses
        when attached (:func:`vision_layer`), so a sweep records the reason as that run's error.

        Raises:
            UserError: ``retention`` outside ``(0, 1]``.
        """
        check_share(retention, "retention")
        press = cls(ratio=round(retention, 9), positions=positions)
        press.predict(model)
        try:
            _, index = vision_layer(model)
        except UnsupportedInputError as exc:  # refused when attached: the run records why
            press.schedule_note = str(exc)
            return press
        grids, _ = adapter_for(model).prediction_grids()
        dom, ctx = split_counts(press.kept_count(sum(r * c for r, c in grids), grids))
        press.schedule_note = (
            f"{dom} dominant + {ctx} contextual tokens per image by [CLS] attention at vision layer {index}, "
            f"for target {retention:g}"
        )
        return press
