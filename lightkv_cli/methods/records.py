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
        input_removed: vision tokens removed before decoder layer 0 (pre-LLM methods: the prompt the
            decoder sees is ``S − input_removed`` long, so layer 0 no longer holds the whole prompt); 0
            for every other method.
    """

    evicts_text: ClassVar[bool]
    input_removed: int

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
        layer: the decoder layer after which the stage ran (−1: before layer 0, a pre-LLM method).
        seq_len_in, seq_len_out: sequence length before and after (same for every row).
        vision_in, vision_out: vision tokens per row before and after.
        guidance: ``(B, vision_in)`` float32 weights the stage used (None if the method uses none).
        merge_pairs: per row, ``(m, 2)`` long original-prompt indices ``(merged token, token it
            merged into)`` (None for methods that drop rather than merge).
        inputs_out: vision tokens of each visual input (image or video) of row 0 after the stage.
        inputs_out_rows: per row, vision tokens of each of its visual inputs after the stage (row 0:
            :attr:`inputs_out`).
    """

    layer: int
    seq_len_in: int
    seq_len_out: int
    vision_in: int
    vision_out: int
    guidance: torch.Tensor | None = None
    merge_pairs: list[torch.Tensor] | None = None
    inputs_out: list[int] = field(default_factory=list)
    inputs_out_rows: list[list[int]] = field(default_factory=list)
    #: device tensors recorded inside the prefill, copied to the host by :meth:`PrefillRecord.to_host`
    pending: dict = field(default_factory=dict, repr=False, compare=False)

    def to_host(
        self,
        owners: list[int] | None,
        num_grids: int,
        row_owners: list[list[int] | None] | None = None,
        row_grids: list[int] | None = None,
    ) -> None:
        """Copy what the stage recorded on the device to the host fields (once; later calls do nothing).

        ``pending`` may hold ``guidance`` ``(B, n)``, ``pairs`` ``(B, m, 2)`` (positions in the stage's
        input sequence), ``pairs_index`` ``(B, S_in)`` (that sequence's prompt indices; absent for the
        first stage, whose input is the prompt) and ``grid`` ``(B, n_out)`` (the grid of each surviving
        vision token of every row; ``grid0``, ``(n_out,)`` of row 0 only, is accepted too).

        Args:
            owners: row 0's grid → visual input map (None: each grid its own input).
            num_grids: row 0's number of grids.
            row_owners: every row's map (None: row 0's for every row).
            row_grids: every row's number of grids (None: ``num_grids`` for every row).
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
        grid = p.get("grid")
        if grid is None and "grid0" in p:
            grid = p["grid0"].unsqueeze(0)
        if grid is not None:
            self.inputs_out_rows = _inputs_per_row(grid.detach().cpu(), owners, num_grids, row_owners, row_grids)
            self.inputs_out = self.inputs_out_rows[0] if self.inputs_out_rows else []


def _inputs_per_row(
    grid: torch.Tensor,
    owners: list[int] | None,
    num_grids: int,
    row_owners: list[list[int] | None] | None,
    row_grids: list[int] | None,
) -> list[list[int]]:
    """Vision tokens of each visual input of every row from ``(B, n)`` grid ids: one bincount over the grids
    of all rows (row ``b``'s ids offset by ``b·G``), then summed into inputs with one ``scatter_add_``."""
    B = grid.shape[0]
    counts_g = list(row_grids) if row_grids is not None else [num_grids] * B
    maps = list(row_owners) if row_owners is not None else [owners] * B
    if len(counts_g) < B or len(maps) < B:  # fewer layouts than rows: row 0's for every row
        counts_g, maps = [num_grids] * B, [owners] * B
    G = max([1, *counts_g])
    ids = (grid.long() + torch.arange(B).view(B, 1) * G).reshape(-1)
    per_grid = torch.bincount(ids, minlength=B * G)[: B * G].view(B, G)
    owner = torch.zeros(B, G, dtype=torch.long)
    inputs = []
    for b in range(B):
        o = list(range(counts_g[b])) if maps[b] is None else list(maps[b])
        owner[b, : len(o)] = torch.tensor(o, dtype=torch.long)
        inputs.append((max(o) + 1) if o else 0)
    counts = torch.zeros(B, max([1, *inputs]), dtype=torch.long).scatter_add_(1, owner, per_grid)
    return [[int(c) for c in counts[b, : inputs[b]]] for b in range(B)]


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
        input_tokens_rows: per row, :attr:`input_tokens` of that row (row 0: :attr:`input_tokens`).
        input_removed: vision tokens per row removed before decoder layer 0 (pre-LLM methods, whose one
            stage has ``layer == -1``); 0 for methods that shorten the sequence inside the decoder.

    Row 0's fields (``input_tokens``, ``grids``, :attr:`per_image_retention`) describe the first row; the
    ``_rows`` fields (:attr:`input_tokens_rows`, :attr:`per_image_retention_rows`) every row, from the
    same device tensors (copied to the host when the record is read).
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
    input_tokens_rows: list[list[int]] = field(default_factory=list)
    input_removed: int = 0
    owners: list[int] | None = field(default=None, repr=False, compare=False)
    #: every row's layout (host), read by :meth:`to_host` for the per-row fields
    layouts: list | None = field(default=None, repr=False, compare=False)
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
        rows, self.layouts = self.layouts, None
        row_owners = row_grids = None
        if rows is not None:
            self.input_tokens_rows = [self.input_tokens] + [r.input_counts() for r in rows[1:]]
            row_owners, row_grids = [r.owners for r in rows], [len(r.grids) for r in rows]
        elif not self.input_tokens_rows and self.input_tokens:
            self.input_tokens_rows = [list(self.input_tokens)]
        for s in self.stages:
            if s.pending:
                s.to_host(self.owners, len(self.grids), row_owners, row_grids)
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
        return self._retention(self.input_tokens, [s.inputs_out for s in self.stages])

    @property
    def per_image_retention_rows(self) -> list[list[float]]:
        """:attr:`per_image_retention` of every row (``B`` lists, one float per visual input of the row);
        row 0's is :attr:`per_image_retention`."""
        rows = self.input_tokens_rows or ([self.input_tokens] if self.input_tokens else [])
        out = []
        for b, tokens in enumerate(rows):
            outs = [s.inputs_out_rows[b] if b < len(s.inputs_out_rows) else [] for s in self.stages]
            out.append(self._retention(tokens, outs))
        return out

    def _retention(self, tokens: list[int], stage_outs: list[list[int]]) -> list[float]:
        """Mean over layers of each input's cached tokens / its tokens, given the inputs after each stage."""
        out = []
        for i, n in enumerate(tokens):
            total = 0
            for lay in range(self.num_layers):
                c = n
                for s, outs in zip(self.stages, stage_outs):
                    if s.layer < lay and i < len(outs):
                        c = outs[i]
                total += c
            out.append(total / (self.num_layers * n) if n else 1.0)
        return out


class EvictionRecord:
    """What a post-prefill eviction did to the last prefill.

    Every layer's cache stays rectangular, ``(B, H_kv, K_l, d)``. In a left-padded batch each row keeps
    what it would keep alone (its own budgets ``k_{l,b}`` from its own real length and statistics), and
    ``K_l = max_b k_{l,b}``; a row with ``k_{l,b} < K_l`` holds ``K_l − k_{l,b}`` *filler* slots before its
    kept entries (copies of its first real token's entry, masked out of attention during decoding, like
    left padding), so its decoding is what it would be alone. Without padding and with equal budgets in every row there
    are no fillers and ``K_l = k_l``.

    Attributes:
        seq_len: prompt length ``S`` (padding included).
        vision_tokens: vision tokens per row before eviction (row 0's).
        num_layers: decoder layers ``L``.
        budgets: ``K_l``, the cache slots each layer holds per KV head after prefill (its cached length),
            length ``L``. Without padding and with equal row budgets: the entries every row keeps; in a
            padded batch: the largest row's count (the padded slot count), see :attr:`row_budgets`.
        row_budgets: ``B × L`` ints, ``k_{l,b}``: real (non-pad) prompt entries kept per KV head by row
            ``b`` in layer ``l`` (fillers excluded); with batch 1, ``[budgets]``.
        row_seq_lens: ``B`` ints, each row's real (unpadded) prompt length ``S_b``.
        layer_vision_tokens: vision tokens each layer keeps, mean over rows and KV heads (floats: heads
            keep different tokens), length ``L`` (fillers never count).
        row_layer_vision_tokens: ``B × L`` floats, vision entries kept by row ``b`` in layer ``l``, mean
            over KV heads; with batch 1, ``[layer_vision_tokens]``.
        kept_index: per layer, ``(B, H_kv, K_l)`` long indices into the (padded) prompt of the kept
            entries, ascending (on CPU). Row ``b``'s last ``k_{l,b}`` slots are its kept entries (subtract
            its number of left pads for indices into its unpadded prompt); its first ``K_l − k_{l,b}``
            slots are fillers and hold −1, so ``idx[b, h][idx[b, h] >= 0]`` drops them.
        details: method-specific statistics. Keys ``row_<name>`` hold one value per row (VL-Cache:
            ``row_density`` and ``row_beta``, ``B × L``; ``row_alpha``, ``B``); the key ``<name>`` without
            the prefix is row 0's (``density``, ``beta``: ``L`` floats; ``alpha``: a float).

    A press records without reading the device: ``layer_vision_tokens`` may be given as an ``(L,)``
    tensor, ``row_layer_vision_tokens`` as a ``(B, L)`` tensor, and ``kept_index`` as one
    ``(B, H_kv, Σ K_l)`` tensor (the layers' indices concatenated along the last axis) or a list of
    tensors, on any device. Each is copied to the host once, when first read (one transfer for all
    layers), and kept there.
    """

    #: eviction removes text entries as well (see :class:`CompressionRecord`)
    evicts_text: ClassVar[bool] = True
    #: prefill runs on the whole prompt
    input_removed: ClassVar[int] = 0

    def __init__(
        self,
        seq_len: int,
        vision_tokens: int,
        num_layers: int,
        budgets: list[int],
        layer_vision_tokens: list[float] | torch.Tensor | None = None,
        kept_index: list[torch.Tensor] | torch.Tensor | None = None,
        details: dict | None = None,
        row_budgets: list[list[int]] | None = None,
        row_layer_vision_tokens: list[list[float]] | torch.Tensor | None = None,
        row_seq_lens: list[int] | None = None,
    ) -> None:
        """Raises ``ValueError`` when neither ``layer_vision_tokens`` nor ``row_layer_vision_tokens`` is given."""
        if layer_vision_tokens is None and row_layer_vision_tokens is None:
            raise ValueError("give layer_vision_tokens or row_layer_vision_tokens")
        self.seq_len = int(seq_len)
        self.vision_tokens = int(vision_tokens)
        self.num_layers = int(num_layers)
        self.budgets = [int(b) for b in budgets]
        self.row_budgets = [list(self.budgets)] if row_budgets is None else [[int(k) for k in r] for r in row_budgets]
        self.row_seq_lens = [self.seq_len] * len(self.row_budgets) if row_seq_lens is None else list(row_seq_lens)
        self.details = {} if details is None else details
        self._layer_vision_tokens = layer_vision_tokens
        self._row_layer_vision_tokens = row_layer_vision_tokens
        self._kept_index = [] if kept_index is None else kept_index

    def __repr__(self) -> str:
        return (
            f"EvictionRecord(seq_len={self.seq_len}, vision_tokens={self.vision_tokens}, "
            f"num_layers={self.num_layers}, budgets={self.budgets}, row_budgets={self.row_budgets}, "
            f"details={self.details})"
        )

    @property
    def row_layer_vision_tokens(self) -> list[list[float]]:
        """Vision entries kept by each row in each layer (mean over KV heads), ``B × L`` floats."""
        rows = self._row_layer_vision_tokens
        if rows is None:
            rows = self._row_layer_vision_tokens = [list(self.layer_vision_tokens)]
        elif isinstance(rows, torch.Tensor):
            rows = self._row_layer_vision_tokens = [[float(x) for x in r] for r in rows.tolist()]
        return rows

    @property
    def layer_vision_tokens(self) -> list[float]:
        """Vision tokens each layer keeps (mean over rows and KV heads), ``L`` floats."""
        lvt = self._layer_vision_tokens
        if lvt is None:
            rows = self.row_layer_vision_tokens
            lvt = [sum(col) / len(rows) for col in zip(*rows)]
        elif isinstance(lvt, torch.Tensor):
            lvt = [float(x) for x in lvt.tolist()]
        self._layer_vision_tokens = lvt
        return lvt

    @property
    def kept_index(self) -> list[torch.Tensor]:
        """Per layer ``(B, H_kv, K_l)`` long kept prompt indices, ascending (leading fillers −1), on CPU
        (copied once, when first read)."""
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
        self.row_layer_vision_tokens  # noqa: B018
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
        """Fraction of all prompt KV slots held, over every layer: ``Σ K_l / (L·S)`` (padding and fillers
        included; per row see :attr:`row_kv_retention`)."""
        return sum(self.budgets) / (self.num_layers * self.seq_len)

    @property
    def row_kv_retention(self) -> list[float]:
        """Per row, the fraction of its real prompt KV entries it keeps over every layer:
        ``Σ_l k_{l,b} / (L·S_b)`` with ``S_b`` its real (unpadded) length (:attr:`row_seq_lens`), ``B`` floats."""
        return [sum(r) / (self.num_layers * n) if n else 1.0 for r, n in zip(self.row_budgets, self.row_seq_lens)]
