"""Architecture, tokenizer and processor of the embedded easy-VQA demo model.

A ``LlavaForConditionalGeneration``:

* vision tower: CLIP-style, 128 px input, 8 px patches → a 16×16 grid of 256 vision tokens, two
  encoder layers; the language model reads the last one (``vision_feature_layer=-1``). The encoder
  lets an object's token see its neighbours, so it can tell the object's shape; the training recipe
  (``train.py``: per-token labels, then the tower frozen) keeps the object's colour and shape in the
  tokens that cover it, so the answer lives in a few vision tokens.
  ``vision_feature_select_strategy="default"`` drops the CLS token, as LLaVA-1.5.
* projector: LLaVA's two-layer GELU MLP, applied per token.
* decoder: a small Llama with grouped-query attention (``TEXT_CONFIG``).
* tokenizer: a word-level ``tokenizers`` model over the easy-VQA vocabulary plus the prompt words
  ``user``, ``assistant``, ``:`` and the special tokens ``<unk> <s> </s> <pad> <image>``; lower-cases.
* processor: ``LlavaProcessor`` with a ``CLIPImageProcessor`` (resize + centre-crop to 128 px, CLIP
  mean/std), expanding each ``<image>`` into 256 placeholders.
"""

from __future__ import annotations

from lightkv_cli.models.tiny import SPECIAL_TOKENS  # the same special tokens as the tiny model

PROMPT_WORDS = ["user", "assistant", ":"]

VISION_CONFIG = dict(
    hidden_size=192,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=128,
    patch_size=8,
    projection_dim=64,
)

#: The language model reads the last encoder layer's output (``hidden_states[-1]``).
VISION_FEATURE_LAYER = -1

TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=12,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
)

#: CLIP's image mean and standard deviation (what ``CLIPImageProcessor`` uses by default).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tokenizer(words: list[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (ids follow ``SPECIAL_TOKENS``,
    ``PROMPT_WORDS``, then ``words`` in the given order).

    Text is lower-cased and split on whitespace and punctuation (``\\w+|[^\\w\\s]+``); unknown words
    map to ``<unk>``. ``<s>`` is prepended to every encoded text. Decoding joins words with spaces.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in SPECIAL_TOKENS + PROMPT_WORDS + list(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
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
    """The ``LlavaConfig`` of the demo model, with token ids taken from ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION_CONFIG),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_processor(tokenizer, vision_config):
    """A ``LlavaProcessor`` for ``tokenizer`` and the CLIP ``vision_config`` (128 px, CLIP mean/std)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def prompt_text(question: str) -> str:
    """The LLaVA prompt the model is trained with (the same as ``LlavaAdapter.format_prompt``)."""
    return "USER: <image>\n" + question + " ASSISTANT:"
