"""Prefill and greedy decode under a compression method, timed, with the KV cache read back.

This is the measured path of the profiler. It mirrors what ``model.generate`` does for greedy
decoding (positions from the 2-D attention mask, a ``DynamicCache``, the logits of the last
position only) so that prefill and every decode step can be timed on their own, CUDA-synchronised
on GPU. The cache is inspected right after prefill: what each layer holds is measured from the key
and value tensors themselves, never assumed from the schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lightkv_cli.measure.memory import PeakMemory
from lightkv_cli.measure.timing import Stopwatch
from lightkv_cli.models.placement import cuda_devices

if TYPE_CHECKING:
    from lightkv_cli.methods.records import CompressionRecord


@dataclass
class CacheStats:
    """What the KV cache holds after prefill, per request (batch row), measured from its tensors.

    Attributes:
        layer_seq_lens: tokens held by each layer's keys (``L`` ints).
        layer_bytes: bytes of each layer's K and V tensors per request (``L`` ints).
        vision_tokens: vision tokens of the prompt before compression.
        text_tokens: non-vision tokens of the prompt (padding included).
        layer_vision_tokens: vision tokens held by each layer. In-prefill methods never touch text, so
            this is ``layer_seq_lens - text_tokens``; after post-prefill eviction (which also evicts
            text, per KV head) it is the mean over KV heads of the vision entries kept (a float).
        processed_seq_lens: tokens each layer processed during prefill (what the FLOPs estimate
            needs): the cached lengths for in-prefill methods, the whole prompt for eviction.
    """

    layer_seq_lens: list[int]
    layer_bytes: list[int]
    vision_tokens: int
    text_tokens: int
    layer_vision_tokens: list[float] = field(default_factory=list)
    processed_seq_lens: list[int] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Bytes of every K and V tensor held, per request."""
        return sum(self.layer_bytes)

    @property
    def layer_vision_bytes(self) -> list[int]:
        """Bytes of each layer's K and V entries that belong to vision tokens, per request."""
        return [
            int(b * v // n) if n else 0
            for b, v, n in zip(self.layer_bytes, self.layer_vision_tokens, self.layer_seq_lens)
        ]

    @property
    def vision_bytes(self) -> int:
        """Bytes of K and V entries that belong to vision tokens, all layers, per request."""
        return sum(self.layer_vision_bytes)

    @property
    def vision_retention(self) -> float:
        """Mean over layers of (vision tokens held / vision tokens before compression)."""
        if not self.vision_tokens:
            return 1.0
        return sum(self.layer_vision_tokens) / (len(self.layer_vision_tokens) * self.vision_tokens)


def cache_stats(cache, vision_tokens: int, record: CompressionRecord | None = None) -> CacheStats:
    """Measure a ``DynamicCache`` right after prefill.

    Without a record, or after an in-prefill method (``record.evicts_text`` False), layer 0 holds the
    whole prompt and every token a layer lost is a vision token (text is never touched), hence
    ``vision held = held - text``, measured from the cache. A pre-LLM method removed
    ``record.input_removed`` vision tokens before layer 0 (text untouched too), so the prompt's text is
    ``held_0 + input_removed - vision``. After post-prefill eviction
    (``record.evicts_text`` True: text entries went too, per KV head) the vision entries each layer
    kept come from the record (its kept indices), and every layer processed the whole prompt.

    Args:
        cache: the ``DynamicCache`` filled by a prefill (keys ``(B, H_kv, S_l, d)`` per layer).
        vision_tokens: vision tokens per row of the prompt.
        record: the press's ``last_prefill`` (a
            :class:`~lightkv_cli.methods.records.CompressionRecord`), or None.

    Returns:
        :class:`CacheStats` per request (bytes divided by the batch size).
    """
    lens, sizes = [], []
    batch = 1
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        batch = k.shape[0]
        lens.append(int(k.shape[-2]))
        sizes.append((k.numel() * k.element_size() + v.numel() * v.element_size()) // batch)
    if record is not None and record.evicts_text:
        return CacheStats(
            layer_seq_lens=lens,
            layer_bytes=sizes,
            vision_tokens=vision_tokens,
            text_tokens=record.seq_len - vision_tokens,
            layer_vision_tokens=list(record.layer_vision_tokens),
            processed_seq_lens=record.processed_seq_lens,
        )
    text = lens[0] + _input_removed(record) - vision_tokens
    return CacheStats(
        layer_seq_lens=lens,
        layer_bytes=sizes,
        vision_tokens=vision_tokens,
        text_tokens=text,
        layer_vision_tokens=[n - text for n in lens],
        processed_seq_lens=list(lens),
    )


def _input_removed(record: CompressionRecord | None) -> int:
    """Vision tokens a pre-LLM method removed before layer 0 (0 without a record or for other methods)."""
    return int(getattr(record, "input_removed", 0) or 0)


def cache_stats_rows(
    cache, vision_tokens: int, pads: Sequence[int], record: CompressionRecord | None = None
) -> list[CacheStats]:
    """:func:`cache_stats` for each row of a left-padded batch, counting only the row's real entries.

    A layer's keys are ``(B, H_kv, S_l, d)`` for every row; row ``b`` has ``pads[b]`` padding entries among
    them (in-prefill methods never remove text, padding included), so it holds ``S_l − pads[b]`` real
    entries. After post-prefill eviction the record says how many real entries each row kept per KV head
    (``row_budgets``, ``row_layer_vision_tokens``); slots beyond them hold masked filler. Bytes are the
    row's real entries times the layer's bytes per cached token, so a row's figures equal what the same
    prompt measures alone at batch 1.

    Args:
        cache: the ``DynamicCache`` filled by the batch's prefill.
        vision_tokens: vision tokens of every row (a batch shares its vision-token count).
        pads: left pads of each row (``B`` ints).
        record: the press's ``last_prefill``, or None.

    Returns:
        One :class:`CacheStats` per row.
    """
    per_token, lens = [], []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        B, S_l = k.shape[0], int(k.shape[-2])
        lens.append(S_l)
        total = k.numel() * k.element_size() + v.numel() * v.element_size()
        per_token.append(total // (B * S_l) if S_l else 0)
    out = []
    evicted = record is not None and record.evicts_text
    row_budgets = getattr(record, "row_budgets", None) if evicted else None
    row_vision = getattr(record, "row_layer_vision_tokens", None) if evicted else None
    for b, pad in enumerate(pads):
        if evicted:
            held = list(row_budgets[b]) if row_budgets is not None else list(record.budgets)
            vis = list(row_vision[b]) if row_vision is not None else list(record.layer_vision_tokens)
            real = record.seq_len - pad
            out.append(
                CacheStats(
                    layer_seq_lens=[int(h) for h in held],
                    layer_bytes=[int(h) * t for h, t in zip(held, per_token)],
                    vision_tokens=vision_tokens,
                    text_tokens=real - vision_tokens,
                    layer_vision_tokens=vis,
                    processed_seq_lens=[real] * len(held),
                )
            )
            continue
        held = [n - pad for n in lens]
        text = held[0] + _input_removed(record) - vision_tokens
        out.append(
            CacheStats(
                layer_seq_lens=held,
                layer_bytes=[h * t for h, t in zip(held, per_token)],
                vision_tokens=vision_tokens,
                text_tokens=text,
                layer_vision_tokens=[h - text for h in held],
                processed_seq_lens=list(held),
            )
        )
    return out


@dataclass
class GenerationResult:
    """One measured greedy generation.

    Attributes:
        tokens: generated token ids per row, up to and excluding the end-of-sequence token.
        first_logits: ``(B, V)`` float32 logits of the first generated token (on CPU).
        prefill_ms: wall time of the prefill forward (vision encoder included) = time to first token.
        decode_ms: wall time of each decode step (one token per row each), in ms.
        cache: what the KV cache held after prefill, per request of the batch (padding included).
        peak_memory_bytes: peak memory during the generation (see ``peak_memory_kind``).
        peak_memory_kind: ``cuda_allocator``, ``process_rss_peak`` or ``process_rss_lifetime_peak``.
        peak_memory_per_device: for a model over several GPUs (``--device-map``), each GPU's allocator peak
            (``"cuda:1"`` → bytes); empty otherwise.
        row_caches: what the cache held for each row, its real entries only (:func:`cache_stats_rows`).
        stopped: per row, the end-of-sequence id it stopped on, or None (it ran to ``max_new_tokens``).
        continuation_logits: with ``continuation=``: per row the ``(m_b, V)`` float32 CPU logits of the
            teacher-forced continuation (vision ids at ``-inf``), position ``t`` predicting the token after
            fed token ``t``; else None.
        followup_tokens: with ``followup=``: per row the follow-up answer's token ids (EOS excluded).
        followup_logits: with ``followup=``: ``(n, B, V)`` float32 CPU logits of the follow-up's ``n`` greedy
            steps (before suppression), for checks against an uncached reference.

    ``cache.processed_seq_lens`` are the tokens each decoder layer processed in prefill (what the
    FLOPs estimate needs).
    """

    tokens: list[list[int]]
    first_logits: torch.Tensor
    prefill_ms: float
    decode_ms: list[float]
    cache: CacheStats
    peak_memory_bytes: int
    peak_memory_kind: str
    row_caches: list[CacheStats] = field(default_factory=list)
    stopped: list[int | None] = field(default_factory=list)
    continuation_logits: list[torch.Tensor] | None = None
    followup_tokens: list[list[int]] | None = None
    followup_logits: torch.Tensor | None = None
    peak_memory_per_device: dict[str, int] = field(default_factory=dict)


#: ``greedy_generate(continuation=OWN)``: teacher-force the run's own answer (the uncompressed reference).
OWN = "own"


def reference_continuation(tokens: Sequence[int], stopped: int | None) -> tuple[list[int], list[int]]:
    """What a teacher-forced continuation feeds and predicts for a reference answer.

    Args:
        tokens: the reference's generated tokens ``y_1..y_T`` (EOS excluded).
        stopped: the end-of-sequence id it stopped on, or None (it ran to the token limit).

    Returns:
        ``(fed, targets)``: ``targets = y_2..y_T`` plus the EOS when it stopped on one (the first token
        is scored from prefill), and ``fed = y_1..y_m`` with ``m = len(targets)``: fed token ``t``'s
        logits predict ``targets[t]``.
    """
    targets = list(tokens[1:]) + ([stopped] if stopped is not None and tokens else [])
    return list(tokens[: len(targets)]), targets


def greedy_generate(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    vision_tokens: int,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    press=None,
    suppress_token_ids: Sequence[int] = (),
    pads: Sequence[int] | None = None,
    continuation: Sequence[Sequence[int]] | str | None = None,
    followup: Sequence[Sequence[int]] | None = None,
) -> GenerationResult:
    """Prefill ``inputs`` and decode greedily, timing prefill and each decode step.

    Two optional scoring passes reuse the same compressed cache (neither is timed, neither prefills the
    image again):

    - ``followup``: after the answer, each row's follow-up turn is appended (what the answer left unfed,
      its end-of-sequence token, then the turn's tokens) and answered greedily, as a second question of
      the same conversation. Rows of a batch end their answers at different steps; the positions they
      decoded past their end are masked out (0 in the 2-D mask) and positions continue from each row's
      own length, so a row's follow-up is what it is alone.
    - ``continuation``: the cache is cut back to what prefill left (each layer to its own length) and
      each row's given tokens are fed in one forward (teacher forcing), right-padded to the longest row;
      ``OWN`` feeds the row's own answer (:func:`reference_continuation`). The logits come back in
      ``continuation_logits``.

    Args:
        model: a vision-language model (``LlavaForConditionalGeneration``, ...) in eval mode.
        inputs: processor output on the model's device (``input_ids`` ``(B, S)``,
            ``attention_mask`` ``(B, S)``, ``pixel_values``...).
        vision_tokens: vision tokens per row (to split the cache into vision and text).
        max_new_tokens: upper bound on generated tokens (≥ 1).
        eos_token_id: stop a row when it emits this token (or any of these tokens).
        press: a compression method (``LightKV(...)``) or None for the uncompressed model.
        suppress_token_ids: tokens never generated (their logits are set to ``-inf`` before the
            argmax), e.g. the image placeholder token, which a model with random weights may
            otherwise emit; ``first_logits`` are recorded before suppression.
        pads: left pads of each row of a left-padded batch (:mod:`lightkv_cli.engine.batching`), for the
            per-row cache figures (``row_caches``); None: no padding.
        continuation: per row the token ids to teacher-force after prefill (may be empty), ``OWN``, or None.
        followup: per row the token ids of a follow-up turn (after the answer's EOS), or None.

    Returns:
        :class:`GenerationResult`.

    Raises:
        torch.OutOfMemoryError: propagated, so the caller can record the run as ``oom``.
        UnsupportedInputError: ``continuation`` or ``followup`` with a cache layer that cannot be cut back
            (a sliding window that dropped entries).
    """
    from transformers import DynamicCache

    device = inputs["input_ids"].device
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    suppress = list(suppress_token_ids)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    batch = mask.shape[0]
    # Positions as generate() computes them, per family (1-D from the mask; Qwen's 3-D M-RoPE).
    from lightkv_cli.methods.hf_compat import cache_kwarg
    from lightkv_cli.models.adapters import adapter_for

    adapter = adapter_for(model)
    position_ids = adapter.prefill_position_ids(inputs, mask)
    ctx = press(model) if press is not None else contextlib.nullcontext()
    decode_ms: list[float] = []
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    stopped: list[int | None] = [None] * batch
    cont_logits = followup_tokens = followup_logits = None
    with torch.inference_mode(), ctx, PeakMemory(device, cuda_devices(model)) as peak:
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        pass_cache = cache_kwarg(model.forward, cache)
        with Stopwatch(device) as sw:
            out = model(
                **{**inputs, "attention_mask": mask},
                position_ids=position_ids,
                **pass_cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1]
            next_tok = _suppressed(logits, suppress).argmax(-1)
        prefill_ms = sw.ms
        first_logits = logits.float().cpu()
        record = getattr(press, "last_prefill", None)
        stats = cache_stats(cache, vision_tokens, record)
        rows = cache_stats_rows(cache, vision_tokens, list(pads) if pads is not None else [0] * batch, record)
        last_pos = adapter.next_position_ids(position_ids) - 1
        prompt_mask, prompt_last, prefill_lens = mask, last_pos, [layer.keys.shape[-2] for layer in cache.layers]
        fed_steps = 0
        for step in range(max_new_tokens):
            _take(next_tok.cpu().tolist(), tokens, done, stopped, eos)
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            last_pos = last_pos + 1
            with Stopwatch(device) as sw:
                out = model(
                    input_ids=next_tok.unsqueeze(1),
                    attention_mask=mask,
                    position_ids=last_pos,
                    **pass_cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                next_tok = _suppressed(out.logits[:, -1], suppress).argmax(-1)
            decode_ms.append(sw.ms)
            fed_steps += 1
        if followup is not None:
            followup_tokens, followup_logits = _followup(
                model,
                pass_cache,
                [list(f) for f in followup],
                tokens,
                stopped,
                fed_steps,
                mask,
                prompt_last,
                max_new_tokens,
                eos,
                suppress,
            )
        if continuation is not None:
            if continuation == OWN:
                fed = [reference_continuation(t, e)[0] for t, e in zip(tokens, stopped)]
            else:
                fed = [list(c) for c in continuation]
            _cut_back(cache, prefill_lens)
            cont_logits = _teacher_forced(model, pass_cache, fed, prompt_mask, prompt_last, suppress)
        del cache, pass_cache, out
    return GenerationResult(
        tokens=tokens,
        first_logits=first_logits,
        prefill_ms=prefill_ms,
        decode_ms=decode_ms,
        cache=stats,
        peak_memory_bytes=int(peak.peak_bytes or 0),
        peak_memory_kind=peak.kind or "",
        peak_memory_per_device=dict(peak.per_device),
        row_caches=rows,
        stopped=stopped,
        continuation_logits=cont_logits,
        followup_tokens=followup_tokens,
        followup_logits=followup_logits,
    )


def _take(ids: list[int], tokens: list[list[int]], done: list[bool], stopped: list, eos: set[int]) -> None:
    """Append one greedy step's token of every row still generating to ``tokens``; a row that emits an
    end-of-sequence id stops (``done``) and records it in ``stopped`` (in place)."""
    for b, t in enumerate(ids):
        if done[b]:
            continue
        if t in eos:
            done[b], stopped[b] = True, t
        else:
            tokens[b].append(t)


def _cut_back(cache, lengths: Sequence[int]) -> None:
    """Cut every layer of ``cache`` back to ``lengths[l]`` entries (what it held after prefill).

    Raises:
        UnsupportedInputError: a sliding-window layer that no longer holds its first entries.
    """
    from lightkv_cli.errors import UnsupportedInputError

    for layer, n in zip(cache.layers, lengths):
        held = layer.keys.shape[-2]
        if held == n:
            continue
        if getattr(layer, "is_sliding", False) and held < n:
            raise UnsupportedInputError("a sliding-window cache layer dropped entries; it cannot be cut back")
        layer.keys = layer.keys[..., :n, :]
        layer.values = layer.values[..., :n, :]


def _teacher_forced(model, pass_cache, fed: list[list[int]], mask, last_pos, suppress) -> list[torch.Tensor]:
    """One forward of each row's ``fed`` tokens (right-padded) after the cache's prompt; per row ``(m_b, V)``."""
    M = max((len(f) for f in fed), default=0)
    if M == 0:
        return [torch.zeros(0, 0) for _ in fed]
    device = mask.device
    fill = next(t for f in fed for t in f)  # padding after a row's tokens: never seen by them (causal)
    ids = torch.tensor([f + [f[-1] if f else fill] * (M - len(f)) for f in fed], dtype=torch.long, device=device)
    out = model(
        input_ids=ids,
        attention_mask=torch.cat([mask, mask.new_ones(mask.shape[0], M)], dim=1),
        position_ids=last_pos + torch.arange(1, M + 1, device=device),
        **pass_cache,
        use_cache=True,
    )
    logits = _suppressed(out.logits.float(), suppress).cpu()
    return [logits[b, : len(f)] for b, f in enumerate(fed)]


def _followup(
    model, pass_cache, turns, tokens, stopped, fed_steps: int, mask, last_pos, max_new_tokens: int, eos, suppress
) -> tuple[list[list[int]], torch.Tensor]:
    """Answer each row's follow-up turn from the cache its answer left (see :func:`greedy_generate`); the
    answers and the ``(n, B, V)`` logits of their steps."""
    B, device = len(turns), mask.device
    # what each row's answer fed (its tokens, then its EOS), and what it left unfed
    spoken = [list(t) + ([e] if e is not None else []) for t, e in zip(tokens, stopped)]
    real = [min(len(s), fed_steps) for s in spoken]
    prompt_len = mask.shape[1] - fed_steps
    keep = torch.tensor([[1] * r + [0] * (fed_steps - r) for r in real], dtype=mask.dtype, device=device)
    mask = torch.cat([mask[:, :prompt_len], keep.view(B, fed_steps)], dim=1)
    chunks = [s[r:] + list(t) for s, r, t in zip(spoken, real, turns)]
    lens = [len(c) for c in chunks]
    M = max(lens)
    fill = next(t for c in chunks for t in c)
    ids = torch.tensor([c + [fill] * (M - len(c)) for c in chunks], dtype=torch.long, device=device)
    chunk_mask = torch.tensor([[1] * n + [0] * (M - n) for n in lens], dtype=mask.dtype, device=device)
    mask = torch.cat([mask, chunk_mask], dim=1)
    before = torch.tensor(real, device=device).view(B, 1)  # tokens each row holds past its prompt
    pos = last_pos + before + torch.arange(1, M + 1, device=device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **pass_cache, use_cache=True)
    last = torch.tensor([n - 1 for n in lens], device=device)
    logits = out.logits[torch.arange(B, device=device), last]
    nxt = _suppressed(logits, suppress).argmax(-1)
    steps = [logits.float()]  # kept on the device, copied to the host once at the end
    pos = last_pos + before + torch.tensor(lens, device=device).view(B, 1)  # each row's last position
    answers: list[list[int]] = [[] for _ in range(B)]
    done, ended = [False] * B, [None] * B
    for step in range(max_new_tokens):
        _take(nxt.cpu().tolist(), answers, done, ended, eos)
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos + 1
        out = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos, **pass_cache, use_cache=True)
        steps.append(out.logits[:, -1].float())
        nxt = _suppressed(out.logits[:, -1], suppress).argmax(-1)
    return answers, torch.stack(steps).cpu()


def _suppressed(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """``logits`` ``(..., V)`` with the given token ids at ``-inf`` (a copy; unchanged when none)."""
    if not token_ids:
        return logits
    out = logits.clone()
    out[..., token_ids] = float("-inf")
    return out
