"""What a press did to the last prefill it saw: the records every method publishes as ``press.last_prefill``.

- :class:`PrefillRecord` (with one :class:`StageRecord` per stage): in-prefill methods
  (:class:`~lightkv_cli.methods.base.SequencePress`: LightKV, FastV, RandomDrop) that shorten the
  sequence inside the decoder; text is never touched and layer 0 keeps the whole prompt.
- :class:`EvictionRecord`: post-prefill eviction (:class:`~lightkv_cli.methods.eviction.EvictionPress`:
  VL-Cache, SnapKV), which cuts every layer's cache (text included, per KV head) once prefill ends.

Both satisfy :class:`CompressionRecord`, the protocol that cache accounting
(:func:`lightkv_cli.runtime.cache_stats`) and the sweep read, so they never ask which method ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch


class CompressionRecord(Protocol):
    """What every ``press.last_prefill`` provides (counts per batch row).

    Attributes:
        seq_len: prompt length ``S`` (padding included).
        vision_tokens: vision tokens per row before compression.
        num_layers: decoder layers ``L``.
        layer_seq_lens: tokens each layer holds in its cache after prefill (``L`` ints).
        layer_vision_tokens: vision tokens each layer holds after prefill (``L`` numbers; a mean over KV
            heads, possibly fractional, after per-head eviction).
        processed_seq_lens: tokens each layer processed during prefill (``L`` ints; what the FLOPs
            estimate needs).
        vision_retention: mean over layers of vision tokens held / vision tokens before compression.
        evicts_text: True when entries were removed from the cache after prefill, text included, so the
            cached length of a layer no longer says how many vision tokens it holds (the record's
            :attr:`layer_vision_tokens` does); False when only vision tokens were removed, so
            ``vision held = held − text`` can be measured from the cache itself.
    """

    evicts_text: ClassVar[bool]

    @property
    def seq_len(self) -> int: ...

    @property
    def vision_tokens(self) -> int: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def layer_seq_lens(self) -> list[int]: ...

    @property
    def layer_vision_tokens(self) -> list[int] | list[float]: ...

    @property
    def processed_seq_lens(self) -> list[int]: ...

    @property
    def vision_retention(self) -> float: ...


@dataclass
class StageRecord:
    """What one reduction stage did during the last prefill.

    Attributes:
        layer: the decoder layer after which the stage ran.
        seq_len_in, seq_len_out: sequence length before and after (same for every row).
        vision_in, vision_out: vision tokens per row before and after.
        guidance: ``(B, vision_in)`` float32 weights the stage used (None if the method uses none).
        merge_pairs: per row, ``(m, 2)`` long original-prompt indices ``(merged token, token it
            merged into)`` (None for methods that drop rather than merge).
        inputs_out: vision tokens of each visual input (image or video) of row 0 after the stage.
    """

    layer: int
    seq_len_in: int
    seq_len_out: int
    vision_in: int
    vision_out: int
    guidance: torch.Tensor | None = None
    merge_pairs: list[torch.Tensor] | None = None
    inputs_out: list[int] = field(default_factory=list)
    #: device tensors recorded inside the prefill, copied to the host by :meth:`PrefillRecord.to_host`
    pending: dict = field(default_factory=dict, repr=False, compare=False)

    def to_host(self, owners: list[int] | None, num_grids: int) -> None:
        """Copy what the stage recorded on the device to the host fields (once; later calls do nothing).

        ``pending`` may hold ``guidance`` ``(B, n)``, ``pairs`` ``(B, m, 2)`` (positions in the stage's
        input sequence), ``pairs_index`` ``(B, S_in)`` (that sequence's prompt indices; absent for the
        first stage, whose input is the prompt) and ``grid0`` ``(n_out,)`` (the grid of each of row 0's
        surviving vision tokens).
        """
        p, self.pending = self.pending, {}
        if "guidance" in p:
            self.guidance = p["guidance"].detach().float().cpu()
        if "pairs" in p:
            pairs = p["pairs"].detach().cpu()  # (B, m, 2) positions in the stage's input sequence
            if "pairs_index" in p:  # that sequence's tokens as prompt indices, (B, S_in)
                B, m, _ = pairs.shape
                pairs = p["pairs_index"].detach().cpu().gather(1, pairs.reshape(B, -1)).view(B, m, 2)
            self.merge_pairs = list(pairs.unbind(0))
        if "grid0" in p:
            per_grid = torch.bincount(p["grid0"].detach().cpu(), minlength=num_grids)[:num_grids]
            owner = torch.arange(num_grids) if owners is None else torch.tensor(owners, dtype=torch.long)
            counts = torch.zeros(int(owner.max()) + 1 if num_grids else 0, dtype=torch.long)
            if num_grids:
                counts.index_add_(0, owner, per_grid)
            self.inputs_out = [int(c) for c in counts]


@dataclass
class PrefillRecord:
    """What a :class:`~lightkv_cli.methods.base.SequencePress` did to the last prefill it saw.

    Attributes:
        seq_len: prompt length ``S`` (padding included).
        vision_tokens: vision tokens per row before compression.
        num_layers: decoder layers ``L``.
        stages: one :class:`StageRecord` per stage that removed at least one token.
        layer_seq_lens: tokens each decoder layer processed (and cached), length ``L``.
        layer_vision_tokens: vision tokens each decoder layer processed (and cached), length ``L``.
        kept_index: for each stage that removed tokens, ``(B, seq_len_out)`` long indices into the
            original prompt of the tokens that survived it (a merged token: its B token's index).
        input_tokens: vision tokens of each visual input (image or video, prompt order) of row 0
            before compression, special tokens included.
        grids: ``(rows, cols)`` of every grid of row 0 (see ``VisionLayout.grids``).
        special_tokens: never-merged vision tokens of row 0 (e.g. LLaVA-NeXT newlines).
    """

    #: in-prefill methods remove vision tokens only (see :class:`CompressionRecord`)
    evicts_text: ClassVar[bool] = False

    seq_len: int
    vision_tokens: int
    num_layers: int
    stages: list[StageRecord] = field(default_factory=list)
    layer_seq_lens: list[int] = field(default_factory=list)
    layer_vision_tokens: list[int] = field(default_factory=list)
    kept_index: list[torch.Tensor] = field(default_factory=list)
    input_tokens: list[int] = field(default_factory=list)
    grids: list[tuple[int, int]] = field(default_factory=list)
    special_tokens: int = 0
    owners: list[int] | None = field(default=None, repr=False, compare=False)
    #: row 0's layout (host), read by :meth:`to_host` for ``input_tokens`` and ``special_tokens``
    layout0: object = field(default=None, repr=False, compare=False)

    def to_host(self) -> PrefillRecord:
        """Copy every tensor recorded on the model's device during prefill to the host (idempotent).

        Presses record device tensors inside the prefill (a host copy there would synchronise the
        device in the middle of the measured forward) and call this when the record is read
        (``press.last_prefill``).
        """
        lay, self.layout0 = self.layout0, None
        if lay is not None:
            self.input_tokens = lay.input_counts()
            self.special_tokens = int((~lay.mergeable).sum())
        for s in self.stages:
            if s.pending:
                s.to_host(self.owners, len(self.grids))
        self.kept_index = [k if k.device.type == "cpu" else k.cpu() for k in self.kept_index]
        return self

    @property
    def processed_seq_lens(self) -> list[int]:
        """Tokens each layer processed in prefill: what it cached (:attr:`layer_seq_lens`)."""
        return list(self.layer_seq_lens)

    @property
    def vision_retention(self) -> float:
        """Mean over all layers of (vision tokens cached / vision tokens before compression)."""
        if self.vision_tokens == 0:
            return 1.0
        return sum(self.layer_vision_tokens) / (self.num_layers * self.vision_tokens)

    @property
    def per_image_retention(self) -> list[float]:
        """Vision retention of each visual input (image or video) of row 0, in prompt order: mean over
        all layers of its cached tokens / its tokens before compression."""
        out = []
        for i, n in enumerate(self.input_tokens):
            total = 0
            for lay in range(self.num_layers):
                c = n
                for s in self.stages:
                    if s.layer < lay and i < len(s.inputs_out):
                        c = s.inputs_out[i]
                total += c
            out.append(total / (self.num_layers * n) if n else 1.0)
        return out


class EvictionRecord:
    """What a post-prefill eviction did to the last prefill.

    Attributes:
        seq_len: prompt length ``S``.
        vision_tokens: vision tokens per row before eviction.
        num_layers: decoder layers ``L``.
        budgets: tokens each layer keeps per KV head (its cached length after prefill), length ``L``.
        layer_vision_tokens: vision tokens each layer keeps, mean over rows and KV heads (floats: heads
            keep different tokens), length ``L``.
        kept_index: per layer, ``(B, H_kv, k_l)`` long indices into the prompt of the kept entries,
            ascending (on CPU).
        details: method-specific statistics (VL-Cache: per-layer density and β).

    A press records without reading the device: ``layer_vision_tokens`` may be given as an ``(L,)``
    tensor and ``kept_index`` as one ``(B, H_kv, Σ k_l)`` tensor (the layers' indices concatenated along
    the last axis) or a list of tensors, on any device. Each is copied to the host once, when first read
    (one transfer for all layers), and kept there.
    """

    #: eviction removes text entries as well (see :class:`CompressionRecord`)
    evicts_text: ClassVar[bool] = True

    def __init__(
        self,
        seq_len: int,
        vision_tokens: int,
        num_layers: int,
        budgets: list[int],
        layer_vision_tokens: list[float] | torch.Tensor,
        kept_index: list[torch.Tensor] | torch.Tensor | None = None,
        details: dict | None = None,
    ) -> None:
        self.seq_len = int(seq_len)
        self.vision_tokens = int(vision_tokens)
        self.num_layers = int(num_layers)
        self.budgets = [int(b) for b in budgets]
        self.details = {} if details is None else details
        self._layer_vision_tokens = layer_vision_tokens
        self._kept_index = [] if kept_index is None else kept_index

    def __repr__(self) -> str:
        return (
            f"EvictionRecord(seq_len={self.seq_len}, vision_tokens={self.vision_tokens}, "
            f"num_layers={self.num_layers}, budgets={self.budgets}, details={self.details})"
        )

    @property
    def layer_vision_tokens(self) -> list[float]:
        """Vision tokens each layer keeps (mean over rows and KV heads), ``L`` floats."""
        if isinstance(self._layer_vision_tokens, torch.Tensor):
            self._layer_vision_tokens = [float(x) for x in self._layer_vision_tokens.tolist()]
        return self._layer_vision_tokens

    @property
    def kept_index(self) -> list[torch.Tensor]:
        """Per layer ``(B, H_kv, k_l)`` long kept prompt indices, ascending, on CPU (copied once, when first read)."""
        kept = self._kept_index
        if isinstance(kept, torch.Tensor):
            self._kept_index = [t.contiguous() for t in kept.cpu().split(self.budgets, dim=-1)]
        elif any(t.device.type != "cpu" for t in kept):
            host = torch.cat([t.reshape(-1) for t in kept]).cpu()
            parts = host.split([t.numel() for t in kept])
            self._kept_index = [p.view(t.shape) for p, t in zip(parts, kept)]
        return self._kept_index

    def to_host(self) -> EvictionRecord:
        """Copy the tensors recorded on the device to the host now (idempotent; reading the fields does it
        lazily otherwise)."""
        self.layer_vision_tokens  # noqa: B018 - the properties convert on first read
        self.kept_index  # noqa: B018
        return self

    @property
    def layer_seq_lens(self) -> list[int]:
        """Tokens cached by each layer after prefill (= :attr:`budgets`)."""
        return list(self.budgets)

    @property
    def processed_seq_lens(self) -> list[int]:
        """Tokens each layer processed in prefill: all ``S`` (eviction happens afterwards)."""
        return [self.seq_len] * self.num_layers

    @property
    def vision_retention(self) -> float:
        """Mean over layers of (vision tokens kept / vision tokens before eviction)."""
        if self.vision_tokens == 0:
            return 1.0
        return sum(self.layer_vision_tokens) / (self.num_layers * self.vision_tokens)

    @property
    def kv_retention(self) -> float:
        """Fraction of all prompt KV entries kept, over every layer: ``Σ k_l / (L·S)``."""
        return sum(self.budgets) / (self.num_layers * self.seq_len)
