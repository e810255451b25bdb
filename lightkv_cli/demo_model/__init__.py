"""The embedded easy-VQA demo model: a small LLaVA trained from scratch by lightkv itself.

* :data:`CHECKPOINT_DIR`: the shipped checkpoint (``config.json``, ``model.safetensors``, tokenizer
  and processor files, ``MODEL_CARD.md``, ``metrics.json``), loadable offline with
  ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``.
* :data:`TESTSET_PROMPTS`: a fixed 200-question subset of the easy-VQA test split in lightkv's
  prompts format (image paths relative to the file), for ``lightkv profile --prompts``.
* ``python -m lightkv_cli.demo_model.train`` rebuilds both deterministically (needs the optional
  ``train`` extra: ``pip install 'lightkv[train]'``).
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: The model name users type (``lightkv profile --model easyvqa``); also lightkv's default model.
DEMO_NAME = "easyvqa"
#: Directory of the shipped checkpoint.
CHECKPOINT_DIR = _HERE / "checkpoint"
#: Directory of the shipped test subset (``prompts.jsonl`` + ``images/``).
TESTSET_DIR = _HERE / "testset"
#: The shipped prompts file (JSON lines: ``{"image", "question", "answer"}``).
TESTSET_PROMPTS = TESTSET_DIR / "prompts.jsonl"

__all__ = ["CHECKPOINT_DIR", "DEMO_NAME", "TESTSET_DIR", "TESTSET_PROMPTS"]
