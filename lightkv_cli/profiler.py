"""The profile: the uncompressed model and LightKV at a sweep of target retentions, on the user's inputs.

Data flows one way: prepared inputs → one measured greedy generation per (run, input, repeat) →
per-run aggregates (retention, bytes, times, FLOPs, quality against the uncompressed run) →
a results dictionary following the schema in ``shared/docs/DESIGN.md``. Nothing here prints; the
caller passes ``on_progress`` to show progress and ``results_path`` to have every finished run
written to disk at once (atomically), so an interrupted profile loses nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from lightkv_cli import __version__
from lightkv_cli.errors import UserError
from lightkv_cli.inputs import ImageInput, PromptItem
from lightkv_cli.methods.lightkv import LightKV
from lightkv_cli.models.loader import LoadedModel
from lightkv_cli.quality import InputQuality, score_input, summarize
from lightkv_cli.runtime import GenerationResult, greedy_generate
from lightkv_cli.telemetry import Spread, environment_info, prefill_flops

SCHEMA = "lightkv.results/1"
DEFAULT_RETENTIONS = (1.0, 0.9, 0.75, 0.55, 0.4)


@dataclass
class ProfileSettings:
    """Knobs of a profile (the ``settings`` section of the results file).

    Attributes:
        retentions: target average vision retentions; 1.0 is the uncompressed reference, which
            always runs first.
        guidance, positions: LightKV modes (see :class:`~lightkv_cli.methods.lightkv.LightKV`).
        max_new_tokens: greedy decode length bound.
        repeats: timed generations per (run, input); the first also gives the answer.
        warmup: untimed generations per run before measuring.
        min_fidelity: the recommendation's threshold on answer match and top-1 agreement.
    """

    retentions: Sequence[float] = DEFAULT_RETENTIONS
    guidance: str = "cross"
    positions: str = "keep"
    max_new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    min_fidelity: float = 0.95

    def to_dict(self) -> dict:
        """The ``settings`` section of the results file."""
        return {
            "retentions": [float(r) for r in self.retentions],
            "guidance": self.guidance,
            "positions": self.positions,
            "max_new_tokens": self.max_new_tokens,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "min_fidelity": self.min_fidelity,
        }


@dataclass
class ProfileInput:
    """One (image, question) pair, with its processor output on the model's device."""

    id: str
    image: ImageInput
    question: str
    answer: str | None
    tensors: dict
    prompt_tokens: int
    vision_tokens: int

    def to_dict(self) -> dict:
        """One entry of the ``inputs`` section of the results file."""
        return {
            "id": self.id,
            "image": str(self.image.path),
            "sha256": self.image.sha256,
            "width": self.image.width,
            "height": self.image.height,
            "question": self.question,
            "answer": self.answer,
            "prompt_tokens": self.prompt_tokens,
            "vision_tokens": self.vision_tokens,
        }


@dataclass
class RunSpec:
    """One run: a method with its parameters at a target retention."""

    id: str
    method: str
    target_retention: float
    press: LightKV | None = None

    def params(self) -> dict:
        """The method's parameters as recorded in the results file (empty when uncompressed)."""
        if self.press is None:
            return {}
        p = self.press
        return {
            "layers": list(p.layers),
            "windows": list(p.windows),
            "ratios": [round(r, 6) for r in p.ratios],
            "guidance": p.guidance,
            "positions": p.positions,
            "schedule_note": p.schedule_note,
        }


def prepare_inputs(
    loaded: LoadedModel, images: Sequence[ImageInput], prompts: Sequence[PromptItem]
) -> list[ProfileInput]:
    """Build the model inputs for every (image, question) pair.

    Args:
        loaded: the model (its processor formats and tokenises the prompt).
        images: loaded images, one per prompt item, in the same order.
        prompts: the questions (and optional answers).

    Returns:
        One :class:`ProfileInput` per pair, tensors on the model's device and dtype.
    """
    names = [im.path.name for im in images]
    out = []
    vision_per_image = loaded.adapter.vision_tokens_per_image()
    image_token = loaded.adapter.image_token_id()
    for image, item in zip(images, prompts):
        ident = image.path.name if names.count(image.path.name) == 1 else f"{image.path.name}#L{item.line}"
        text = loaded.adapter.format_prompt(item.question)
        enc = loaded.processor(images=image.image, text=text, return_tensors="pt")
        tensors = {}
        for k, v in enc.items():
            if not isinstance(v, torch.Tensor):
                continue
            v = v.to(loaded.device)
            if v.is_floating_point():
                v = v.to(loaded.dtype)
            tensors[k] = v
        n_vis = int((tensors["input_ids"][0] == image_token).sum())
        if n_vis != vision_per_image:
            raise RuntimeError(f"processor produced {n_vis} vision tokens, expected {vision_per_image}")
        out.append(
            ProfileInput(
                id=ident, image=image, question=item.question, answer=item.answer, tensors=tensors,
                prompt_tokens=int(tensors["input_ids"].shape[1]), vision_tokens=n_vis,
            )
        )
    return out


def plan_runs(loaded: LoadedModel, settings: ProfileSettings) -> list[RunSpec]:
    """The uncompressed reference, then LightKV at each target retention below 1, highest first.

    Raises:
        UserError: a target outside ``(0, 1]`` or below what the model can reach.
    """
    runs = [RunSpec(id="uncompressed", method="uncompressed", target_retention=1.0)]
    for r in sorted({float(x) for x in settings.retentions}, reverse=True):
        if not (0.0 < r <= 1.0) or math.isnan(r):
            raise UserError(f"retention {r:g} is outside (0, 1]; give targets like 0.9,0.75,0.55")
        if r == 1.0:
            continue
        press = LightKV.for_retention(r, loaded.model, guidance=settings.guidance, positions=settings.positions)
        runs.append(RunSpec(id=f"lightkv@{r:g}", method="lightkv", target_retention=r, press=press))
    return runs


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as strict JSON to ``path`` atomically (temporary file + rename in the same folder).

    Non-finite numbers (an infinite KL divergence, say) are written as ``null``, since JSON has no
    representation for them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(data), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class _InputOutcome:
    answer: str
    result: GenerationResult
    prefill_ms: list[float]
    decode_ms: list[float]
    peak: int


class Profiler:
    """Runs a profile and builds its results (see module docstring).

    Args:
        loaded: the model.
        inputs: prepared inputs (:func:`prepare_inputs`).
        settings: the profile's knobs.
        command: the command line, recorded in the results.
        skipped: ``{"path", "reason"}`` of inputs that could not be used, recorded in the results.
        results_path: when given, the results are written there after every finished run.
        on_progress: called as ``on_progress(run_id, input_id)`` after every (run, input).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        inputs: list[ProfileInput],
        settings: ProfileSettings,
        command: str = "",
        skipped: list[dict] | None = None,
        results_path: Path | None = None,
        on_progress: Callable[[str, str], None] | None = None,
    ):
        self.loaded = loaded
        self.inputs = inputs
        self.settings = settings
        self.results_path = results_path
        self.on_progress = on_progress or (lambda run, inp: None)
        self.runs = plan_runs(loaded, settings)
        self.results = {
            "schema": SCHEMA,
            "tool_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "environment": {**environment_info(loaded.device), "dtype": str(loaded.dtype).replace("torch.", "")},
            "model": loaded.info(),
            "settings": settings.to_dict(),
            "inputs": [i.to_dict() for i in inputs],
            "skipped": list(skipped or []),
            "runs": [],
            "recommendation": None,
            "complete": False,
        }
        self._reference: dict[str, _InputOutcome] = {}

    @property
    def total_steps(self) -> int:
        """(run, input) pairs to process, for a progress bar."""
        return len(self.runs) * len(self.inputs)

    def run(self) -> dict:
        """Run every planned run in order and return the results dictionary.

        Raises:
            torch.OutOfMemoryError, RuntimeError: when the uncompressed reference itself fails
                (nothing can be compared without it). A LightKV run that fails is recorded with
                ``status: "oom"`` or ``"error"`` and the profile goes on.
        """
        for spec in self.runs:
            run = self._run_one(spec)
            self.results["runs"].append(run)
            self.results["recommendation"] = recommend(self.results["runs"], self.settings.min_fidelity)
            self._save()
        self.results["complete"] = True
        self._save()
        return self.results

    def _save(self) -> None:
        if self.results_path is not None:
            write_json_atomic(self.results_path, self.results)

    def _generate(self, spec: RunSpec, inp: ProfileInput) -> GenerationResult:
        return greedy_generate(
            self.loaded.model,
            inp.tensors,
            vision_tokens=inp.vision_tokens,
            max_new_tokens=self.settings.max_new_tokens,
            eos_token_id=self.loaded.model.generation_config.eos_token_id,
            press=spec.press,
        )

    def _run_one(self, spec: RunSpec) -> dict:
        tokenizer = getattr(self.loaded.processor, "tokenizer", self.loaded.processor)
        outcomes: dict[str, _InputOutcome] = {}
        status, error = "ok", None
        try:
            for _ in range(self.settings.warmup):
                self._generate(spec, self.inputs[0])
            for inp in self.inputs:
                results = [self._generate(spec, inp) for _ in range(max(1, self.settings.repeats))]
                first = results[0]
                outcomes[inp.id] = _InputOutcome(
                    answer=tokenizer.decode(first.tokens[0], skip_special_tokens=True).strip(),
                    result=first,
                    prefill_ms=[r.prefill_ms for r in results],
                    decode_ms=[ms for r in results for ms in r.decode_ms],
                    peak=max(r.peak_memory_bytes for r in results),
                )
                self.on_progress(spec.id, inp.id)
        except torch.OutOfMemoryError as exc:
            if spec.press is None:
                raise
            status, error = "oom", f"out of memory: {str(exc).splitlines()[0]}"
            _free_device_memory(self.loaded.device)
        except Exception as exc:  # recorded, so that one failing run does not lose the profile
            if spec.press is None:
                raise
            status, error = "error", f"{type(exc).__name__}: {exc}"
        if spec.press is None:
            self._reference = outcomes
        return self._summarise(spec, outcomes, status, error)

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
        per_input, qualities = [], []
        prefill_all, decode_all, flops, peaks = [], [], [], []
        n_layers = self.loaded.adapter.num_layers
        layer_bytes = [0.0] * n_layers
        layer_vis = [0.0] * n_layers
        layer_seq = [0.0] * n_layers
        for inp in self.inputs:
            o = outcomes[inp.id]
            ref = self._reference[inp.id]
            q: InputQuality = score_input(
                ref.answer, o.answer, ref.result.first_logits[0], o.result.first_logits[0], inp.answer
            )
            qualities.append(q)
            c = o.result.cache
            f = prefill_flops(text_config, c.layer_seq_lens)
            flops.append(f)
            prefill_all += o.prefill_ms
            decode_all += o.decode_ms
            peaks.append(o.peak)
            for i in range(n_layers):
                layer_bytes[i] += c.layer_bytes[i] / len(self.inputs)
                layer_vis[i] += c.layer_vision_tokens[i] / len(self.inputs)
                layer_seq[i] += c.layer_seq_lens[i] / len(self.inputs)
            per_input.append(
                {
                    "input": inp.id,
                    "answer": o.answer,
                    "generated_tokens": len(o.result.tokens[0]),
                    "vision_retention": c.vision_retention,
                    "kv_bytes": c.total_bytes,
                    "kv_bytes_vision": c.vision_bytes,
                    "prefill_ms": Spread.of(o.prefill_ms).median,
                    "decode_ms_per_token": Spread.of(o.decode_ms).median if o.decode_ms else None,
                    "flops_prefill": f,
                    "quality": q.to_dict(),
                }
            )
        n = len(self.inputs)
        kv_total = sum(p["kv_bytes"] for p in per_input) / n
        kv_vis = sum(p["kv_bytes_vision"] for p in per_input) / n
        decode = Spread.of(decode_all) if decode_all else None
        run.update(
            {
                "vision_retention": sum(p["vision_retention"] for p in per_input) / n,
                "kv_bytes": kv_total,
                "kv_bytes_vision": kv_vis,
                "kv_bytes_per_layer": layer_bytes,
                "cached_tokens_per_layer": layer_seq,
                "vision_tokens_per_layer": layer_vis,
                "prefill_ms": Spread.of(prefill_all).to_dict(),
                "time_to_first_token_ms": Spread.of(prefill_all).median,
                "decode_ms_per_token": decode.to_dict() if decode else None,
                "tokens_per_s": (1000.0 / decode.median) if decode and decode.median > 0 else None,
                "peak_memory_bytes": max(peaks),
                "peak_memory_kind": outcomes[self.inputs[0].id].result.peak_memory_kind,
                "flops_prefill": sum(flops) / n,
                "quality": summarize(qualities).to_dict(),
                "per_input": per_input,
            }
        )
        ref_run = next((r for r in self.results["runs"] if r["method"] == "uncompressed"), None)
        base_flops = ref_run["flops_prefill"] if ref_run else run["flops_prefill"]
        base_kv = ref_run["kv_bytes_vision"] if ref_run else run["kv_bytes_vision"]
        run["flops_ratio"] = run["flops_prefill"] / base_flops if base_flops else None
        run["kv_vision_ratio"] = run["kv_bytes_vision"] / base_kv if base_kv else None
        return run


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def recommend(runs: list[dict], min_fidelity: float) -> dict:
    """The lowest-retention run whose answer match and top-1 agreement are both ≥ ``min_fidelity``.

    The uncompressed run always qualifies (it is the reference), so a recommendation always exists;
    when it is the uncompressed run, the reason names the closest compressed run and what it missed.

    Returns:
        ``{"run", "target_retention", "vision_retention", "kv_bytes_vision", "reason"}``.
    """
    ok = [r for r in runs if r.get("status") == "ok" and "quality" in r]
    good = [
        r for r in ok
        if r["quality"]["answer_match"] >= min_fidelity and r["quality"]["top1_agreement"] >= min_fidelity
    ]
    if not good:
        return {"run": None, "reason": "no run finished"}
    best = min(good, key=lambda r: (r["vision_retention"], r["kv_bytes"]))
    rec = {
        "run": best["id"],
        "target_retention": best["target_retention"],
        "vision_retention": best["vision_retention"],
        "kv_bytes_vision": best["kv_bytes_vision"],
        "min_fidelity": min_fidelity,
    }
    if best["method"] == "uncompressed":
        compressed = [r for r in ok if r["method"] != "uncompressed"]
        if compressed:
            near = max(compressed, key=lambda r: min(r["quality"]["answer_match"], r["quality"]["top1_agreement"]))
            qq = near["quality"]
            rec["reason"] = (
                f"no compressed run kept answer match and top-1 agreement ≥ {min_fidelity:g}; closest: {near['id']} "
                f"(answer match {qq['answer_match']:.2f}, top-1 {qq['top1_agreement']:.2f}); keep the full cache"
            )
        else:
            rec["reason"] = "only the uncompressed run finished"
    else:
        qq = best["quality"]
        rec["reason"] = (
            f"lowest vision retention with answer match {qq['answer_match']:.2f} and top-1 agreement "
            f"{qq['top1_agreement']:.2f} (both ≥ {min_fidelity:g})"
        )
    return rec
