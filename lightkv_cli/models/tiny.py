"""The embedded tiny models: one small model per supported family that needs no download.

``tiny`` (the default) is LLaVA-1.5-architecture and described below; ``tiny-llava-next``,
``tiny-qwen2-vl`` and ``tiny-qwen2.5-vl`` are built the same way (see :data:`TINY_MODELS`) so every
family is exercised on a CPU.

It is built deterministically from the config in this file (random weights, seed 0), saved with
``save_pretrained`` into lightkv's cache directory, and loaded back with ``from_pretrained``, exactly
the code path a real checkpoint takes. Shapes follow LLaVA-1.5: a CLIP-style vision tower at 336 px
with 14 px patches gives a 24×24 grid of 576 vision tokens per image; the decoder is a small Llama
with grouped-query attention (8 query heads, 2 key/value heads, 16 layers).

The weights are random: answers are not meaningful, and every report made with ``tiny`` says so.
Memory, latency and the mechanics of compression (token counts, bytes, retention) are real.

The tokenizer is a byte-level BPE with no merges, made with the ``tokenizers`` library: every UTF-8
byte is one token, plus the special tokens ``<unk> <s> </s> <pad> <image>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_NAME = "tiny"
TINY_REVISION = "v1"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# CLIP vision tower: 336 px, patch 14 -> 24x24 = 576 patch tokens (+1 CLS, dropped by the
# "default" feature-select strategy, as in LLaVA-1.5).
VISION_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=336,
    patch_size=14,
    projection_dim=64,
)

# Llama decoder with grouped-query attention.
TEXT_CONFIG = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=16,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    initializer_range=0.05,
)

SEED = 0


def default_cache_dir() -> Path:
    """Where lightkv keeps built artefacts: ``$LIGHTKV_CACHE`` or ``~/.cache/lightkv``."""
    env = os.environ.get("LIGHTKV_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightkv"


#: Extra special tokens of the Qwen-style tiny tokenizers (chat turns and vision placeholders).
QWEN_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def build_tokenizer(extra_special_tokens=(), add_bos: bool = True, eos_token: str = "</s>"):
    """Build the byte-level tokenizer (a ``PreTrainedTokenizerFast``); ``<image>`` has id 4.

    Args:
        extra_special_tokens: more special tokens, with ids right after ``<image>`` (Qwen's
            ``<|image_pad|>`` ...).
        add_bos: put ``<s>`` in front of every encoded text (LLaVA); Qwen adds none.
        eos_token: the end-of-sequence token.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with bos ``<s>``, eos ``eos_token``, pad ``<pad>``,
        unk ``<unk>`` and the extra special token ``<image>`` (plus ``extra_special_tokens``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    # Sorting the byte alphabet keeps ids independent of set-iteration order.
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(vocab) - set(specials)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tok.add_special_tokens(specials)
    extra = {"image_token": "<image>"}
    if "<|image_pad|>" in specials:
        extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=eos_token,
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=extra,
        padding_side="left",
        model_max_length=TEXT_CONFIG["max_position_embeddings"],
    )


def build_config(tokenizer):
    """The ``LlavaConfig`` of the tiny model, with token ids taken from ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab_size = len(tokenizer)
    text = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    vision = CLIPVisionConfig(**VISION_CONFIG)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_processor(tokenizer, vision_config):
    """A ``LlavaProcessor`` for the given tokenizer and CLIP vision config (336 px centre crop).

    Uses ``CLIPImageProcessor`` (its PIL backend when torchvision is absent) with the OpenAI CLIP
    mean and standard deviation, as LLaVA-1.5 does.
    """
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


# --- LLaVA-NeXT: CLIP tower at 112 px (8×8 base grid), anyres tiles of 112 px -------------------
NEXT_VISION_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=112,
    patch_size=14,
    projection_dim=32,
)
#: (height, width) resolutions of the high-resolution view: up to 2×2 or 1×3 tiles of 112 px.
NEXT_PINPOINTS = [[112, 224], [224, 112], [224, 224], [112, 336], [336, 112]]
SMALL_TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=12,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    initializer_range=0.05,
)

# --- Qwen2-VL / Qwen2.5-VL: 14 px patches, 2×2 merge, at most 256 tokens per image --------------
QWEN_VISION_CONFIG = dict(
    depth=2,
    embed_dim=32,
    hidden_size=128,
    num_heads=2,
    mlp_ratio=2,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
QWEN25_VISION_CONFIG = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=128,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=56,
    fullatt_block_indexes=[1],
    tokens_per_second=2,
)
QWEN_TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=12,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    initializer_range=0.05,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
)
#: Pixel bounds of the tiny Qwen image processor: 4 to 256 tokens per image (28 px per token).
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 256


def _build_llava_next(tokenizer):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SMALL_TEXT_CONFIG,
    )
    vision = CLIPVisionConfig(**NEXT_VISION_CONFIG)
    side = vision.image_size // vision.patch_size
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=side * side,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    size = vision.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    return LlavaNextForConditionalGeneration, config, processor


def _qwen_tokenizer():
    return build_tokenizer(QWEN_SPECIAL_TOKENS, add_bos=False, eos_token="<|im_end|>")


def _build_qwen(tokenizer, v25: bool):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lightkv_cli.models.processors import QwenVLProcessor

    if v25:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(QWEN25_VISION_CONFIG)
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(QWEN_VISION_CONFIG)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        QWEN_TEXT_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Config(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    return Model, config, QwenVLProcessor(image_processor, tokenizer)


def _build_llava(tokenizer):
    from transformers import LlavaForConditionalGeneration

    config = build_config(tokenizer)
    return LlavaForConditionalGeneration, config, build_processor(tokenizer, config.vision_config)


#: name → (family, description, tokenizer factory, builder, fingerprint spec).
TINY_MODELS = {
    "tiny": (
        "llava",
        "LLaVA-1.5 architecture: 336 px CLIP tower (24×24 = 576 vision tokens), 16-layer Llama decoder",
        build_tokenizer,
        _build_llava,
        [TINY_REVISION, SPECIAL_TOKENS, VISION_CONFIG, TEXT_CONFIG, SEED],
    ),
    "tiny-llava-next": (
        "llava_next",
        "LLaVA-NeXT architecture: 112 px CLIP tower (8×8 base grid) + anyres tiles "
        "(up to 16×16 + newlines), 12-layer Llama decoder",
        build_tokenizer,
        _build_llava_next,
        ["v1", SPECIAL_TOKENS, NEXT_VISION_CONFIG, NEXT_PINPOINTS, SMALL_TEXT_CONFIG, SEED],
    ),
    "tiny-qwen2-vl": (
        "qwen2_vl",
        "Qwen2-VL architecture: dynamic resolution (4-256 tokens per image, 2×2 merge), M-RoPE, 12-layer decoder",
        _qwen_tokenizer,
        lambda t: _build_qwen(t, False),
        ["v1", QWEN_SPECIAL_TOKENS, QWEN_VISION_CONFIG, QWEN_TEXT_CONFIG, QWEN_MAX_PIXELS, SEED],
    ),
    "tiny-qwen2.5-vl": (
        "qwen2_5_vl",
        "Qwen2.5-VL architecture: dynamic resolution (4-256 tokens per image, 2×2 "
        "merge), windowed vision attention, M-RoPE, 12-layer decoder",
        _qwen_tokenizer,
        lambda t: _build_qwen(t, True),
        ["v1", QWEN_SPECIAL_TOKENS, QWEN25_VISION_CONFIG, QWEN_TEXT_CONFIG, QWEN_MAX_PIXELS, SEED],
    ),
}


def _fingerprint(name: str = TINY_NAME) -> str:
    spec = (
        TINY_MODELS[name][4] if name != TINY_NAME else [TINY_REVISION, SPECIAL_TOKENS, VISION_CONFIG, TEXT_CONFIG, SEED]
    )
    text = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tiny_checkpoint_dir(name: str = TINY_NAME, cache_dir: Path | None = None) -> Path:
    """Where the tiny model ``name`` is (or would be) built."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = "tiny-llava" if name == TINY_NAME else name
    revision = TINY_REVISION if name == TINY_NAME else TINY_MODELS[name][4][0]
    return root / "models" / f"{stem}-{revision}-{_fingerprint(name)}"


def ensure_tiny_checkpoint(cache_dir: Path | None = None, name: str = TINY_NAME) -> Path:
    """Build the tiny checkpoint ``name`` once and return its directory.

    The directory holds what ``from_pretrained`` needs (config, safetensors weights, tokenizer,
    processor). It is written to a temporary directory and renamed into place, so an interrupted
    build never leaves a half-written checkpoint. Its name carries a fingerprint of the config, so a
    change of config builds a new one. Weights are random with seed 0, so every build is identical.

    Args:
        cache_dir: root of lightkv's cache (default :func:`default_cache_dir`).
        name: a key of :data:`TINY_MODELS` (``tiny``, ``tiny-llava-next``, ``tiny-qwen2-vl``,
            ``tiny-qwen2.5-vl``).

    Raises:
        KeyError: unknown ``name``.
        OSError: when the cache directory cannot be written.
    """
    import torch

    _family, _desc, make_tokenizer, builder, _spec = TINY_MODELS[name]
    target = tiny_checkpoint_dir(name, cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        tokenizer = make_tokenizer()
        cls, config, processor = builder(tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = cls(config).eval()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "LIGHTKV_TINY.md").write_text(
            f"Built by lightkv from the config in lightkv_cli/models/tiny.py ({name}). Random weights (seed 0).\n"
        )
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with another process: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
