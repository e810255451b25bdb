"""The embedded ``tiny`` model: a LLaVA-1.5-architecture model that needs no download.

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


def build_tokenizer():
    """Build the byte-level tokenizer (a ``PreTrainedTokenizerFast``); ``<image>`` has id 4.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with bos ``<s>`` (added in front of every encoded
        text), eos ``</s>``, pad ``<pad>``, unk ``<unk>`` and the extra special token ``<image>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    # Sorting the byte alphabet keeps ids independent of set-iteration order.
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(vocab) - set(SPECIAL_TOKENS)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
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
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def _fingerprint() -> str:
    spec = json.dumps([TINY_REVISION, SPECIAL_TOKENS, VISION_CONFIG, TEXT_CONFIG, SEED], sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def ensure_tiny_checkpoint(cache_dir: Path | None = None) -> Path:
    """Build the tiny checkpoint once and return its directory.

    The directory holds what ``from_pretrained`` needs (config, safetensors weights, tokenizer,
    processor). It is written to a temporary directory and renamed into place, so an interrupted
    build never leaves a half-written checkpoint. Its name carries a fingerprint of the config, so a
    change of config builds a new one.

    Raises:
        OSError: when the cache directory cannot be written.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "models" / f"tiny-llava-{TINY_REVISION}-{_fingerprint()}"
    if (target / "config.json").is_file():
        return target
    root.joinpath("models").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root / "models"))
    try:
        tokenizer = build_tokenizer()
        config = build_config(tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = LlavaForConditionalGeneration(config).eval()
        model.save_pretrained(tmp)
        processor = build_processor(tokenizer, config.vision_config)
        processor.save_pretrained(tmp)
        (tmp / "LIGHTKV_TINY.md").write_text(
            "Built by lightkv from the config in lightkv_cli/models/tiny.py. Random weights (seed 0).\n"
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
