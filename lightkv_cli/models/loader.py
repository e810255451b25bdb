"""Load a vision-language model for profiling: the embedded ``tiny`` model, a real checkpoint from
the local Hugging Face cache or a directory, or a real architecture with random weights.

Loading never downloads: real weights come from the local cache (``~/.cache/huggingface``) or a
path; when they are not there, the error says how to get them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightkv_cli.errors import UserError
from lightkv_cli.models.adapters import FamilyAdapter, adapter_for, supported_families

#: Short names for published checkpoints.
ALIASES = {"llava": "llava-hf/llava-1.5-7b-hf"}
#: Shipped configs (architecture only) so that ``--init random`` works offline for aliased models.
_SHIPPED_CONFIGS = {"llava-hf/llava-1.5-7b-hf": "llava-hf__llava-1.5-7b-hf.json"}
INIT_MODES = ("pretrained", "random")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadedModel:
    """A model ready to profile.

    Attributes:
        name: what the user asked for (``tiny``, an alias, a Hub id or a path).
        source: the Hub id or directory it was loaded from.
        model: the ``PreTrainedModel`` (eval mode, on ``device``).
        processor: its processor (tokenizer + image processor).
        adapter: the family adapter.
        init: ``"pretrained"`` or ``"random"``.
        weights_meaningful: False for random weights (quality figures are then not meaningful).
        device, dtype: where and in what precision it runs.
        notes: facts the report must show (e.g. "random weights").
    """

    name: str
    source: str
    model: torch.nn.Module
    processor: object
    adapter: FamilyAdapter
    init: str
    weights_meaningful: bool
    device: torch.device
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)

    def info(self) -> dict:
        """The ``model`` section of the results file."""
        cfg = self.adapter.text_config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        params = sum(p.numel() for p in self.model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {
            "name": self.name,
            "source": self.source,
            "family": self.adapter.family,
            "architecture": type(self.model).__name__,
            "init": self.init,
            "weights_meaningful": self.weights_meaningful,
            "layers": self.adapter.num_layers,
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": heads,
            "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": head_dim,
            "vision_tokens_per_image": self.adapter.vision_tokens_per_image(),
            "image_grid": list(self.adapter.image_grid()),
            "parameters": params,
            "weight_bytes": weight_bytes,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "notes": list(self.notes),
        }


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU.

    Raises:
        UserError: unknown value, or ``cuda`` asked for on a machine without a usable GPU.
    """
    if device not in DEVICES:
        raise UserError(f"unknown device '{device}'; use one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on a GPU that supports it, else float16 on GPU; float32 on CPU.

    Raises:
        UserError: unknown value.
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _missing_weights_message(name: str, source: str) -> str:
    return (
        f"model '{name}' ({source}) is not in the local Hugging Face cache and lightkv never downloads. "
        f"To get it, run on a machine with internet access: `hf download {source}` (LLaVA-1.5-7B is about "
        "14 GB), or copy a checkpoint directory here and pass its path with --model /path/to/checkpoint. "
        "To plan memory and latency without the weights, add --init random (quality is then not meaningful)."
    )


def _family_class(model_type: str):
    if model_type == "llava":
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration
    raise UserError(
        f"model family '{model_type}' is not supported yet; supported: {', '.join(supported_families())}"
    )


def _resolve_source(name: str) -> tuple[str, bool]:
    """(hub id or directory, is_local_dir) for a model name.

    Raises:
        UserError: the name is neither an alias, an existing directory nor a Hub id.
    """
    if name in ALIASES:
        return ALIASES[name], False
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"'{name}' is a path but has no config.json; pass a Hugging Face checkpoint directory")
        return str(path), True
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")):
        return name, False
    known = ", ".join(["tiny", *ALIASES])
    raise UserError(f"unknown model '{name}': use one of {known}, a Hugging Face id (org/name) or a local checkpoint path")


def _load_config(source: str, local: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError:
        if local:
            raise
        shipped = _SHIPPED_CONFIGS.get(source)
        if shipped is None:
            return None
        data = json.loads((Path(__file__).parent / "configs" / shipped).read_text())
        data.pop("_comment", None)
        return AutoConfig.for_model(data.pop("model_type"), **data)


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def load_model(name: str = "tiny", init: str = "pretrained", device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load ``name`` for profiling.

    Args:
        name: ``tiny`` (embedded, no download), an alias (``llava``), a Hugging Face id found in the
            local cache, or a checkpoint directory.
        init: ``pretrained`` (the checkpoint's weights) or ``random`` (the same architecture from its
            config with random weights: memory and latency are real, quality is not meaningful).
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``auto``, ``float16``, ``bfloat16`` or ``float32``.

    Raises:
        UserError: unknown model, weights not available offline, unsupported family, not enough
            memory for random weights, bad device or dtype.
    """
    if init not in INIT_MODES:
        raise UserError(f"unknown --init '{init}'; use one of {', '.join(INIT_MODES)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _quiet_transformers()
    from transformers import AutoProcessor

    if name == "tiny":
        from lightkv_cli.models.tiny import ensure_tiny_checkpoint

        path = ensure_tiny_checkpoint()
        loaded = _from_pretrained(name, str(path), dev, dt, "random", weights_meaningful=False)
        loaded.notes.append(
            "tiny: embedded LLaVA-architecture model with random weights; answers and quality figures are "
            "not meaningful, token counts, bytes and timings are real"
        )
        return loaded

    source, local = _resolve_source(name)
    if init == "pretrained":
        return _from_pretrained(name, source, dev, dt, "pretrained", weights_meaningful=True)

    # --init random: architecture from the cached or shipped config
    try:
        config = _load_config(source, local)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config of '{name}': {exc}") from None
    if config is None:
        raise UserError(
            f"no config for '{name}' is available offline; --init random needs the model's config.json "
            f"in the local cache (`hf download {source} config.json`) or a local checkpoint directory"
        )
    cls = _family_class(config.model_type)
    notes = [
        f"{name}: architecture of {source} with random weights (--init random); memory and latency are real, "
        "answers and quality figures are not meaningful"
    ]
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError):
        processor = _fallback_processor(config)
        notes.append(
            "tokenizer/processor not available offline: used lightkv's byte-level tokenizer, so prompt token "
            "counts differ slightly from the real model's"
        )
    with torch.device("meta"):
        meta = cls(config)
    need = sum(p.numel() for p in meta.parameters()) * torch.empty(0, dtype=dt).element_size()
    del meta
    avail = _available_bytes(dev)
    if avail is not None and need > 0.9 * avail:
        raise UserError(
            f"random weights of '{name}' need {need / 2**30:.1f} GiB in {str(dt).replace('torch.', '')} but only "
            f"{avail / 2**30:.1f} GiB is free on {dev}; use a GPU (--device cuda), a smaller --dtype, or a smaller model"
        )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]), torch.device(dev):
        torch.manual_seed(0)
        model = cls._from_config(config, dtype=dt)
    model = model.eval()
    adapter = adapter_for(model)
    return LoadedModel(name, source, model, processor, adapter, "random", False, dev, dt, notes)


def _fallback_processor(config):
    from lightkv_cli.models.tiny import build_processor, build_tokenizer

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, config.vision_config)
    # Random weights: the placeholder id only has to match what the processor emits.
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if hasattr(config, "image_token_index"):
        config.image_token_index = config.image_token_id
    return processor


def _from_pretrained(name, source, dev, dt, init, weights_meaningful) -> LoadedModel:
    from transformers import AutoConfig, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError:
        raise UserError(_missing_weights_message(name, source)) from None
    cls = _family_class(config.model_type)
    try:
        model = cls.from_pretrained(source, local_files_only=True, dtype=dt, attn_implementation="sdpa")
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    except OSError:
        raise UserError(_missing_weights_message(name, source)) from None
    model = model.to(dev).eval()
    return LoadedModel(name, source, model, processor, adapter_for(model), init, weights_meaningful, dev, dt)
