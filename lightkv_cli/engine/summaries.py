"""The per-run summary of a sweep's quality pass: what a finished run records in the results file.

A mixin of :class:`~lightkv_cli.engine.sweep.Sweep`: from the per-input outcomes of one run (answers,
first-token logits, continuation scores, follow-up answers, what the cache held) it scores every input
against the uncompressed run (:func:`~lightkv_cli.scoring.fidelity.score_input`), aggregates
(:func:`~lightkv_cli.scoring.fidelity.summarize`), adds KV bytes per layer, FLOPs, capacity and token
maps, and returns the run's entry of ``runs``. Nothing here runs the model, except the first image grid
a token map needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightkv_cli.engine.token_maps import first_grid, map_inputs, token_map
from lightkv_cli.inputs import VideoInput
from lightkv_cli.measure.costs import kv_bytes_per_token, max_concurrent_requests, prefill_flops
from lightkv_cli.scoring.continuation import ContinuationScores
from lightkv_cli.scoring.fidelity import InputQuality, score_input, summarize

if TYPE_CHECKING:
    from lightkv_cli.engine.plan import RunSpec
    from lightkv_cli.engine.prepare import ProfileInput
    from lightkv_cli.engine.sweep import _InputOutcome


class Summaries:
    """Run summaries of a sweep (expects the :class:`~lightkv_cli.engine.sweep.Sweep` attributes)."""

    def _summarise(self, spec: RunSpec, outcomes: dict[str, _InputOutcome], status: str, error: str | None) -> dict:
        run = {
            "id": spec.id,
            "method": spec.method,
            "params": spec.params(),
            "target_retention": spec.target_retention,
            "expected_retention": 1.0 if spec.press is None else spec.press.expected_retention,
            "status": status,
        }
        if error:
            run["error"] = error
        if status != "ok" or not outcomes:
            return run
        text_config = self.loaded.adapter.text_config
        per_input, qualities, flops = [], [], []
        n_layers = self.loaded.adapter.num_layers
        n = len(self.inputs)
        layer_bytes = [0.0] * n_layers
        layer_vis = [0.0] * n_layers
        layer_seq = [0.0] * n_layers
        for inp in self.inputs:
            o = outcomes[inp.id]
            ref = self._reference[inp.id]
            if spec.press is None:  # the reference against itself: exactly faithful, by definition
                scores = (
                    None if ref.continuation is None else ContinuationScores(0.0, 0.0, 1.0, 0.0, len(ref.fed or []))
                )
            else:
                scores = o.scores
            followup = None
            if inp.followup_ids and o.followup_answer is not None and ref.followup_answer is not None:
                followup = (ref.followup_answer, o.followup_answer, inp.followup_answer)
            q: InputQuality = score_input(
                ref.answer,
                o.answer,
                ref.first_logits,
                o.first_logits,
                inp.answer,
                prefill_changed=getattr(spec.press, "changes_prefill", True),
                continuation=scores,
                followup=followup,
            )
            qualities.append(q)
            c = o.cache
            f = prefill_flops(text_config, c.processed_seq_lens)
            flops.append(f)
            for i in range(n_layers):
                layer_bytes[i] += c.layer_bytes[i] / n
                layer_vis[i] += c.layer_vision_tokens[i] / n
                layer_seq[i] += c.layer_seq_lens[i] / n
            per_input.append(
                {
                    "input": inp.id,
                    "answer": o.answer,
                    "generated_tokens": len(o.tokens),
                    "vision_retention": c.vision_retention,
                    "kv_bytes": c.total_bytes,
                    "kv_bytes_vision": c.vision_bytes,
                    "prefill_ms": None,
                    "decode_ms_per_token": None,
                    "flops_prefill": f,
                    "quality": q.to_dict(),
                }
            )
            if o.followup_answer is not None:
                per_input[-1]["followup_answer"] = o.followup_answer
            if o.per_image_retention is not None:
                per_input[-1]["per_image_retention"] = o.per_image_retention
        self._add_token_maps(outcomes, per_input, qualities)
        kv_total = sum(p["kv_bytes"] for p in per_input) / n
        run.update(
            {
                "vision_retention": sum(p["vision_retention"] for p in per_input) / n,
                "kv_bytes": kv_total,
                "kv_bytes_vision": sum(p["kv_bytes_vision"] for p in per_input) / n,
                "kv_bytes_per_layer": layer_bytes,
                "cached_tokens_per_layer": layer_seq,
                "vision_tokens_per_layer": layer_vis,
                "quality_batch_size": 1 if spec.method in self._batch1 else self.batch_size,
                "prefill_ms": None,
                "time_to_first_token_ms": None,
                "decode_ms_per_token": None,
                "tokens_per_s": None,
                "timing_ratio": None,
                "peak_memory_bytes": None,
                "peak_memory_kind": None,
                "nvml": None,
                "flops_prefill": sum(flops) / n,
                "capacity": self._capacity(kv_total, 0, "", 1),
                "quality": summarize(qualities).to_dict(),
                "per_input": per_input,
            }
        )
        return run

    def _add_token_maps(
        self, outcomes: dict[str, _InputOutcome], per_input: list[dict], qualities: list[InputQuality]
    ) -> None:
        """Add ``token_map`` to the ``per_input`` entries chosen by :func:`~lightkv_cli.engine.token_maps.map_inputs`
        (at most 8 per run) whose press left a record the map can be built from; others get none."""
        chosen = map_inputs([_kind(i) for i in self.inputs], [q.exact_match for q in qualities])
        for j in chosen:
            inp = self.inputs[j]
            fates = outcomes[inp.id].fates
            if fates is None:
                continue
            try:
                if inp.id not in self._grids:
                    self._grids[inp.id] = first_grid(self.loaded.adapter, self.loaded.model, inp.tensors)
                grid = self._grids[inp.id]
                tmap = token_map(fates, grid) if grid is not None else None
            except Exception:  # a map is an illustration: never lose a run over it
                self._grids.setdefault(inp.id, None)
                tmap = None
            if tmap is not None:
                per_input[j]["token_map"] = tmap

    def _capacity(self, kv_prefill: float, peak: int, peak_kind: str, batch: int) -> dict:
        """Concurrent requests fitting in the memory budget next to the weights (see ``capacity``).

        ``peak`` is the allocator peak of a timed generation of ``batch`` requests (0: not measured yet)."""
        cap = self.results["capacity"]
        per_token = (
            kv_bytes_per_token(self.loaded.adapter.text_config, self.loaded.dtype) * self.loaded.adapter.num_layers
        )
        per_request = kv_prefill + self.settings.max_new_tokens * per_token
        # On GPU the allocator peak of a timed batch minus weights and its caches is the activation memory
        # its prefill needs, per request; on CPU the process RSS says nothing about it.
        reserve = (
            max(0, peak - cap["weight_bytes"] - int(per_request * batch)) // max(1, batch)
            if peak_kind == "cuda_allocator"
            else 0
        )
        fits = (
            max_concurrent_requests(cap["memory_bytes"], cap["weight_bytes"], per_request, reserve)
            if cap["memory_bytes"]
            else None
        )
        return {
            "kv_bytes_per_request": per_request,
            "activation_reserve_bytes": reserve,
            "max_concurrent_requests": fits,
            "ratio_vs_uncompressed": None,
        }


def _kind(inp: ProfileInput) -> str:
    """``"image"`` or ``"video"``, as the results' ``inputs[].kind``."""
    return "video" if isinstance(inp.image, VideoInput) else "image"
