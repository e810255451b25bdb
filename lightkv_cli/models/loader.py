"""Load a vision-language model for profiling: the embedded trained ``easyvqa`` demo model (the
default), the embedded random-weight ``tiny`` models, a real checkpoint from the local Hugging Face
cache or a directory, or a real architecture with random weights.

A Hub id that is not cached is downloaded into the standard Hugging Face cache
(:mod:`lightkv_cli.models.hub`: ``huggingface_hub.snapshot_download``, safetensors only, ``--revision``),
unless ``HF_HUB_OFFLINE=1`` or ``--offline``; then, when the weights are not cached, the error says how to
get them. Weights load with ``use_safetensors=True``, never with ``trust_remote_code``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightkv_cli.demo_model import DEMO_NAME
from lightkv_cli.errors import UserError
from lightkv_cli.models.adapters import FamilyAdapter, adapter_for, supported_families
from lightkv_cli.models.checkpoints import check_checkpoint_dir, damaged_checkpoint
from lightkv_cli.models.hub import fetch_checkpoint, missing_message
from lightkv_cli.models.placement import placed, placement_kwargs

#: Short names for published checkpoints.
ALIASES = {
    "llava": "llava-hf/llava-1.5-7b-hf",
    "llava-next": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-next-mistral": "llava-hf/llava-v1.6-mistral-7b-hf",
    "qwen2-vl": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct",
}
#: Shipped configs (architecture only) so that ``--init random`` works offline for aliased models.
_SHIPPED_CONFIGS = {source: source.replace("/", "__") + ".json" for source in ALIASES.values()}
#: ``config.model_type`` → (transformers class name, family label).
_FAMILY_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
#: The embedded models (random weights, built on first use): one per supported family.
TINY_NAMES = ("tiny", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl")
#: The embedded trained demo model (easy-VQA, see ``lightkv_cli.demo_model``) and the default model.
DEFAULT_MODEL = DEMO_NAME
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
            # Dynamic-resolution families: a representative image (the measured counts are per input).
            "vision_tokens_per_image": self.adapter.vision_tokens_per_image(),
            "image_grid": list(self.adapter.image_grid()),
            "dynamic_resolution": self.adapter.dynamic_resolution,
            "supports_video": self.adapter.supports_video,
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


def _family_class(model_type: str):
    if model_type in _FAMILY_CLASSES:
        import transformers

        return getattr(transformers, _FAMILY_CLASSES[model_type])
    raise UserError(f"model family '{model_type}' is not supported yet; supported: {', '.join(supported_families())}")


def _resolve_source(name: str) -> tuple[str, bool]:
    """(hub id or directory, is_local_dir) for a model name.

    Raises:
        UserError: the name is neither an alias, an existing directory nor a Hub id.
    """
    if name in ALIASES:
        return ALIASES[name], False
    if name == DEMO_NAME:
        from lightkv_cli.demo_model import CHECKPOINT_DIR

        if not (CHECKPOINT_DIR / "model.safetensors").is_file():
            raise UserError(
                f"the embedded {DEMO_NAME} checkpoint is missing from {CHECKPOINT_DIR}; reinstall lightkv, or rebuild "
                "it "
                "with: pip install 'lightkv[train]' && python -m lightkv_cli.demo_model.train"
            )
        return str(CHECKPOINT_DIR), True
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"'{name}' is a path but has no config.json; pass a Hugging Face checkpoint directory")
        return str(path), True
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")):
        return name, False
    known = ", ".join([DEMO_NAME, *TINY_NAMES, *ALIASES])
    raise UserError(
        f"unknown model '{name}': use one of {known}, a Hugging Face id (org/name) or a local checkpoint path"
    )


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


def load_model(
    name: str = DEFAULT_MODEL,
    init: str = "pretrained",
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    offline: bool = False,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load ``name`` for profiling.

    Args:
        name: ``easyvqa`` (embedded trained demo model, no download), ``tiny`` (embedded, random
            weights), an alias (``llava``), a Hugging Face id found in the local cache, or a
            checkpoint directory.
        init: ``pretrained`` (the checkpoint's weights) or ``random`` (the same architecture from its
            config with random weights: memory and latency are real, quality is not meaningful).
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``auto``, ``float16``, ``bfloat16`` or ``float32``.
        revision: branch, tag or commit of a Hub id (``--revision``); None: the default branch.
        offline: download nothing (``--offline``; also when ``HF_HUB_OFFLINE`` is set).
        device_map: ``auto``, ``balanced``, ``balanced_low_0`` or ``sequential`` (``--device-map``), or an explicit
            module → device mapping: the model is placed over the available devices by accelerate (CPU and
            disk offload when they do not hold it); inputs go to the device of its input embeddings. None:
            the whole model on ``device``.

    Raises:
        UserError: unknown model, weights not cached while offline, a download that fails (gated or missing
            repository or revision, no network, full disk), unsupported family, not enough memory for random
            weights, bad device or dtype.
    """
    if init not in INIT_MODES:
        raise UserError(f"unknown --init '{init}'; use one of {', '.join(INIT_MODES)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _quiet_transformers()

    if name in TINY_NAMES:
        from lightkv_cli.models.tiny import TINY_MODELS, ensure_tiny_checkpoint

        path = ensure_tiny_checkpoint(name=name)
        loaded = _from_pretrained(name, str(path), dev, dt, "random", weights_meaningful=False, device_map=device_map)
        loaded.notes.append(
            f"{name}: embedded {TINY_MODELS[name][1].split(':')[0]} model with random weights; answers and quality "
            "figures are not meaningful, token counts, bytes and timings are real"
        )
        return loaded

    source, local = _resolve_source(name)
    if init == "pretrained":
        path = source
        if not local:
            path = fetch_checkpoint(source, revision, offline, missing=missing_message(name, source))
        loaded = _from_pretrained(name, path, dev, dt, "pretrained", weights_meaningful=True, device_map=device_map)
        if not local:
            loaded.source = source
            loaded.notes.append(f"{name}: {source} from the Hugging Face cache ({Path(path).name[:12]})")
        if name == DEMO_NAME:
            loaded.notes.append(_demo_note())
        return loaded

    # --init random: architecture from the cached or shipped config
    if local:
        check_checkpoint_dir(Path(source), weights=False)
    try:
        config = _load_config(source, local)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
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
        processor = _load_processor(config.model_type, source)
    except (OSError, ValueError, TypeError, AttributeError, ImportError):
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
            f"{avail / 2**30:.1f} GiB is free on {dev}; use a GPU (--device cuda), a smaller --dtype, or a smaller "
            "model"
        )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]), torch.device(dev):
        torch.manual_seed(0)
        model = cls._from_config(config, dtype=dt)
    model = model.eval()
    adapter = adapter_for(model)
    return LoadedModel(name, source, model, processor, adapter, "random", False, dev, dt, notes)


def _demo_note() -> str:
    """One line on what the embedded demo model is and how accurate it is (from its ``metrics.json``)."""
    from lightkv_cli.demo_model import CHECKPOINT_DIR

    note = (
        f"{DEMO_NAME}: lightkv's embedded demo model, a small LLaVA trained from scratch on easy-VQA "
        "(one coloured shape on a 128 px canvas); its answers only mean something on easy-VQA-style images"
    )
    try:
        acc = json.loads((CHECKPOINT_DIR / "metrics.json").read_text())["test_accuracy"]["overall"]
    except (OSError, ValueError, KeyError, TypeError):
        return note
    return note + f" ({100 * acc:.1f}% on the easy-VQA test split; see its MODEL_CARD.md)"


def _load_processor(model_type: str, source: str):
    """The checkpoint's processor, offline. Qwen families get lightkv's :class:`QwenVLProcessor`
    (the checkpoint's tokenizer and PIL image processor), which needs no torchvision.

    Raises:
        OSError, ValueError, TypeError, AttributeError, ImportError: not available offline.
    """
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from lightkv_cli.models.processors import QwenVLProcessor

        return QwenVLProcessor.from_pretrained(source, local_files_only=True)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(source, local_files_only=True)


def _fallback_processor(config):
    """A processor for ``--init random`` when the checkpoint's is not available offline: lightkv's
    byte-level tokenizer with the family's image processor at the config's resolution. The config's
    placeholder ids are set to the tokenizer's (random weights: they only have to agree)."""
    from lightkv_cli.models import tiny

    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from lightkv_cli.models.processors import QwenVLProcessor

        tokenizer = tiny.build_tokenizer(tiny.QWEN_SPECIAL_TOKENS, add_bos=False, eos_token="<|im_end|>")
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.QWEN_SPECIAL_TOKENS}
        config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
        config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
        vc = config.vision_config
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size
        )
        return QwenVLProcessor(image_processor, tokenizer)
    tokenizer = tiny.build_tokenizer()
    if config.model_type == "llava_next":
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        size = config.vision_config.image_size
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_grid_pinpoints=config.image_grid_pinpoints,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            image_token="<image>",
        )
    else:
        processor = tiny.build_processor(tokenizer, config.vision_config)
    # Random weights: the placeholder id only has to match what the processor emits.
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if hasattr(config, "image_token_index"):
        config.image_token_index = config.image_token_id
    return processor


def _from_pretrained(name, source, dev, dt, init, weights_meaningful, device_map=None) -> LoadedModel:
    from transformers import AutoConfig

    local = Path(source).is_dir()
    if local:
        check_checkpoint_dir(Path(source))
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError:
        if local:
            raise
        raise UserError(missing_message(name, source)) from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise damaged_checkpoint(source, exc) from None
    cls = _family_class(config.model_type)
    try:
        model = cls.from_pretrained(
            source,
            local_files_only=True,
            dtype=dt,
            attn_implementation="sdpa",
            use_safetensors=True,
            **placement_kwargs(device_map),
        )
    except OSError as exc:
        if local:
            raise damaged_checkpoint(source, exc) from None
        raise UserError(missing_message(name, source)) from None
    except Exception as exc:  # a truncated safetensors file, a shard that does not match its index, ...
        raise damaged_checkpoint(source, exc) from None
    try:
        processor = _load_processor(config.model_type, source)
    except (OSError, ValueError, TypeError, AttributeError, KeyError, ImportError) as exc:
        if not local:
            raise UserError(missing_message(name, source)) from None
        raise UserError(
            f"cannot load the tokenizer and processor of '{source}' ({type(exc).__name__}); copy the checkpoint's "
            "tokenizer and preprocessor files (tokenizer.json, tokenizer_config.json, preprocessor_config.json) "
            "into it"
        ) from None
    model, dev, notes = placed(model, name, dev, device_map)
    return LoadedModel(name, source, model, processor, adapter_for(model), init, weights_meaningful, dev, dt, notes)


def _published_schedules() -> dict[str, dict]:
    """Published default schedules (``profiles/*.published.toml``), by checkpoint id.

    Looked up in ``./profiles`` and in the ``profiles`` folder of the lightkv source tree.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    found: dict[str, dict] = {}
    for folder in (Path.cwd() / "profiles", Path(__file__).resolve().parents[2] / "profiles"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.published.toml")):
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, ValueError):
                continue
            model, method = data.get("model", {}), data.get("method", {})
            if model.get("name") and model["name"] not in found and method.get("layers"):
                found[model["name"]] = {
                    "layers": list(method["layers"]),
                    "windows": list(method.get("windows", [])),
                    "ratios": list(method.get("ratios", [])),
                    "profile": str(path),
                }
    return found


def _weights_in_cache(source: str) -> bool:
    """Whether the Hugging Face cache holds ``source``'s config and weights (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False
    if not isinstance(try_to_load_from_cache(source, "config.json"), str):
        return False
    return any(
        isinstance(try_to_load_from_cache(source, f), str)
        for f in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json")
    )


def list_models() -> list[dict]:
    """Every model name lightkv knows, for ``lightkv models``.

    Returns:
        One dict per name: ``name``, ``source`` (checkpoint id, or "embedded"), ``family``
        (``config.model_type``), ``layers`` (decoder layers), ``weights`` (``embedded``, ``local`` or
        ``missing``), ``published_schedule`` (``{layers, windows, ratios, profile}`` or None). Nothing
        is downloaded or built.
    """
    from lightkv_cli.models import tiny

    text_layers = {
        "tiny": tiny.TEXT_CONFIG["num_hidden_layers"],
        "tiny-llava-next": tiny.SMALL_TEXT_CONFIG["num_hidden_layers"],
        "tiny-qwen2-vl": tiny.QWEN_TEXT_CONFIG["num_hidden_layers"],
        "tiny-qwen2.5-vl": tiny.QWEN_TEXT_CONFIG["num_hidden_layers"],
    }
    from lightkv_cli.demo_model import CHECKPOINT_DIR

    out = []
    try:
        demo = json.loads((CHECKPOINT_DIR / "config.json").read_text())
        out.append(
            {
                "name": DEMO_NAME,
                "source": "embedded (trained)",
                "family": demo["model_type"],
                "layers": demo["text_config"]["num_hidden_layers"],
                "weights": "embedded",
                "published_schedule": None,
            }
        )
    except (OSError, ValueError, KeyError):
        pass
    for name in TINY_NAMES:
        out.append(
            {
                "name": name,
                "source": "embedded",
                "family": tiny.TINY_MODELS[name][0],
                "layers": text_layers[name],
                "weights": "embedded",
                "published_schedule": None,
            }
        )
    published = _published_schedules()
    for name, source in ALIASES.items():
        data = json.loads((Path(__file__).parent / "configs" / _SHIPPED_CONFIGS[source]).read_text())
        out.append(
            {
                "name": name,
                "source": source,
                "family": data["model_type"],
                "layers": data["text_config"]["num_hidden_layers"],
                "weights": "local" if _weights_in_cache(source) else "missing",
                "published_schedule": published.get(source),
            }
        )
    return out
