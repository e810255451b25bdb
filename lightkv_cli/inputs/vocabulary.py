"""Questions with words the model's tokenizer does not know.

A word-level tokenizer (the embedded easy-VQA demo model's) maps every word outside its vocabulary to
its unknown token, so a question such as "What shape is it? Answer with one word." reaches the model
with the second sentence replaced by ``<unk>`` tokens: the model never saw it, and its answer (and the
fidelity of a compressed run to it) says nothing about the question asked. Byte-level BPE tokenizers
(LLaVA, Qwen) have no unknown token and never do this.

* :func:`scan_out_of_vocabulary`: for each text, the pieces of it that the tokenizer maps to its
  unknown token.
* :func:`describe_out_of_vocabulary`: the one note to print about them, or ``None``.

Tokenizes on the CPU with the tokenizer alone; no model, no torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

#: How many unknown words the note quotes.
EXAMPLES = 3


def _tokenizer_of(tokenizer):
    """The tokenizer itself when given a processor (``processor.tokenizer``)."""
    inner = getattr(tokenizer, "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "unk_token_id") else tokenizer


def _spans(text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]], unk: int) -> list[str]:
    """The text under each unknown token (overlapping spans joined), stripped, in order."""
    words: list[str] = []
    start = end = None
    for tok, (a, b) in zip(ids, offsets):
        if tok != unk or b <= a:
            if start is not None:
                words.append(text[start:end])
                start = end = None
            continue
        if start is not None and a < end:  # overlaps the previous unknown piece (byte pieces of one character)
            end = max(end, b)
        else:
            if start is not None:
                words.append(text[start:end])
            start, end = a, b
    if start is not None:
        words.append(text[start:end])
    return [w.strip() for w in words if w.strip()]


def _unique(words: list[str]) -> list[str]:
    return list(dict.fromkeys(words))


def scan_out_of_vocabulary(tokenizer, texts: Sequence[str]) -> list[list[str]]:
    """The words of each text that ``tokenizer`` maps to its unknown token (``tokenizer.unk_token_id``).

    A fast tokenizer reports the character offsets of its tokens; the text under each unknown token is
    one word, as written (original case; a word-level tokenizer splits punctuation off, so ``"word."``
    gives ``'word'`` and ``'.'``). A tokenizer without
    offsets is asked word by word (whitespace-separated), and a word containing an unknown token is
    reported whole. Special tokens are not added.

    Args:
        tokenizer: a Hugging Face tokenizer (or a processor with a ``tokenizer`` attribute).
        texts: the questions, in input order.

    Returns:
        One list per text, in the order of ``texts``: its distinct unknown words in order of first
        appearance (empty when it has none). A tokenizer without an unknown token (``unk_token_id`` is
        ``None``: byte-level BPE) gives only empty lists. Example with the easy-VQA demo model's
        word-level tokenizer: ``"What color is the circle? Answer with one word."`` → ``['Answer',
        'with', 'one', 'word', '.']``.

    Raises:
        Whatever the tokenizer raises for a text it cannot encode (not expected for ``str`` input).
    """
    tok = _tokenizer_of(tokenizer)
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return [[] for _ in texts]
    out: list[list[str]] = []
    fast = bool(getattr(tok, "is_fast", False))
    for text in texts:
        if fast:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            out.append(_unique(_spans(text, enc["input_ids"], enc["offset_mapping"], unk)))
        else:
            words = [w for w in text.split() if unk in tok(w, add_special_tokens=False)["input_ids"]]
            out.append(_unique(words))
    return out


def describe_out_of_vocabulary(results: list[list[str]]) -> str | None:
    """The note to print once about questions with unknown words, or ``None`` when there are none.

    Args:
        results: what :func:`scan_out_of_vocabulary` returned, one list per question.

    Returns:
        e.g. ``"2 of 5 questions contain words the model's tokenizer does not know (e.g. 'Answer',
        'with', 'one'); its answers to them are not meaningful"``: the most frequent unknown words (by
        the number of questions they occur in; words with a letter or digit before punctuation; then in
        order of first appearance), at most :data:`EXAMPLES`. ``None`` when no list has a word.
    """
    affected = [words for words in results if words]
    if not affected:
        return None
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for words in affected:
        for w in words:
            counts[w] += 1
            first.setdefault(w, len(first))
    ranked = sorted(counts, key=lambda w: (-counts[w], not any(ch.isalnum() for ch in w), first[w]))
    examples = ", ".join(repr(w) for w in ranked[:EXAMPLES])
    n, m = len(affected), len(results)
    verb = "contains" if n == 1 else "contain"
    question = "question" if m == 1 else "questions"
    return (
        f"{n} of {m} {question} {verb} words the model's tokenizer does not know (e.g. {examples}); "
        "its answers to them are not meaningful"
    )
