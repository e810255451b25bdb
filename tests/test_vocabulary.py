"""Out-of-vocabulary questions (inputs/vocabulary.py): the demo model's word-level tokenizer and a BPE
tokenizer without an unknown token, both built offline."""

from __future__ import annotations

import pytest

from lightkv_cli.inputs.vocabulary import describe_out_of_vocabulary, scan_out_of_vocabulary

QUESTIONS = [
    "What color is the circle?",
    "What color is the circle? Answer with one word.",
    "Is there a ZEBRA in the image?",
    "What shape is in the image? Answer with one word.",
]


@pytest.fixture(scope="module")
def demo_processor():
    """The easy-VQA demo model's processor, as the loader loads it."""
    from lightkv_cli.models.loader import load_model

    return load_model("easyvqa", init="pretrained", device="cpu", dtype="float32").processor


def test_demo_model_does_not_know_the_answer_instruction(demo_processor):
    tok = demo_processor.tokenizer
    assert tok.unk_token_id is not None
    got = scan_out_of_vocabulary(tok, QUESTIONS)
    # The demo vocabulary is the easy-VQA question words (36 tokens): no "answer", "with", "one", "word", ".".
    assert got == [
        [],
        ["Answer", "with", "one", "word", "."],
        ["ZEBRA"],
        ["Answer", "with", "one", "word", "."],
    ]
    # The words really are unknown: each alone encodes to the unknown token; known words do not.
    for word in ("Answer", "ZEBRA"):
        assert tok(word, add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert tok("circle", add_special_tokens=False)["input_ids"] != [tok.unk_token_id]
    assert describe_out_of_vocabulary(got) == (
        "3 of 4 questions contain words the model's tokenizer does not know (e.g. 'Answer', 'with', 'one'); "
        "its answers to them are not meaningful"
    )
    # The processor itself is accepted too (its tokenizer is used).
    assert scan_out_of_vocabulary(demo_processor, QUESTIONS) == got


def _bpe_without_unk():
    """A tiny BPE tokenizer with no unknown token (unk_token_id is None), trained offline on two sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["what color is the circle", "answer with one word"], trainers.BpeTrainer(vocab_size=60))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_a_tokenizer_without_an_unknown_token_knows_every_word():
    tok = _bpe_without_unk()
    assert tok.unk_token_id is None
    assert scan_out_of_vocabulary(tok, QUESTIONS) == [[], [], [], []]
    assert describe_out_of_vocabulary([[], [], [], []]) is None
    assert scan_out_of_vocabulary(tok, []) == []


class _SlowWordTokenizer:
    """A tokenizer without offsets (not fast): known words get id 1, others the unknown id 0."""

    unk_token_id = 0
    is_fast = False
    vocab = frozenset({"what", "is", "it?"})

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 if w in self.vocab else 0 for w in text.split()]}


def test_without_offsets_words_are_checked_one_by_one():
    assert scan_out_of_vocabulary(_SlowWordTokenizer(), ["what is it?", "what is Foo? Foo"]) == [[], ["Foo?", "Foo"]]


def test_the_note_counts_questions_and_quotes_the_commonest_words():
    note = describe_out_of_vocabulary([["Answer", "word", "."], [], ["Answer", "word"], ["zebra"]])
    assert note == (
        "3 of 4 questions contain words the model's tokenizer does not know (e.g. 'Answer', 'word', 'zebra'); "
        "its answers to them are not meaningful"
    )
    assert describe_out_of_vocabulary([["x"]]) == (
        "1 of 1 question contains words the model's tokenizer does not know (e.g. 'x'); "
        "its answers to them are not meaningful"
    )
    assert describe_out_of_vocabulary([]) is None
