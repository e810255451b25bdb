"""The "easy-VQA on a canvas" task the embedded demo model is trained and tested on.

easy-VQA (PyPI ``easy-vqa`` 1.0, MIT) has 64×64 images of one coloured shape (circle, rectangle,
triangle; 8 colours) on a lightly tinted background, and closed-vocabulary questions about them
(13 answers). In a full 64×64 frame the shape covers much of the image, so almost any subset of
vision tokens answers the question and no compression method can be told apart. Here each image is
scaled and pasted at a random position on a larger canvas filled with the image's own background
tint, so that the answer lives in a few vision tokens; some images stay full-frame (scaled to the
whole canvas) so that large objects remain answerable.

Everything is deterministic: the placement of image ``i`` of a split in variant ``v`` depends only
on ``(seed, split, i, v)``. Training uses a new variant each epoch (augmentation); the test set
always uses variant 0.

``easy-vqa`` is only needed here (retraining, the optional ``train`` extra), never to use the
shipped model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

#: Canvas side in pixels; with 8-pixel patches the model sees a 16×16 token grid.
CANVAS = 128
PATCH = 8
#: Probability that an image is placed full-frame (scaled to the whole canvas).
FULL_FRAME_P = 0.2
#: Side range (pixels, inclusive) of the pasted 64×64 image when not full-frame.
SCALE_RANGE = (40, 80)
#: A pixel belongs to the object when its summed |RGB - background| exceeds this (0..765).
OBJECT_THRESHOLD = 60

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
QUESTION_TYPES = ("shape", "colour", "yes/no")
_SPLIT_CODE = {"train": 0, "test": 1}
_WORD = re.compile(r"[a-z]+")


def question_type(question: str, answer: str) -> str:
    """``"yes/no"``, ``"colour"`` or ``"shape"`` for one easy-VQA question."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "colour" if answer in COLOURS else "shape"


def is_negated(question: str, answer: str) -> bool:
    """True for a negated yes/no question ("is there not a red shape?", "is no circle present?")."""
    if answer not in ("yes", "no"):
        return False
    words = _WORD.findall(question)
    return "not" in words or "no" in words


@dataclass
class Item:
    """One easy-VQA image with its questions.

    Attributes:
        image_id: index of the image in its split.
        path: the 64×64 PNG inside the ``easy_vqa`` package.
        questions: ``(question, answer)`` pairs about the image.
        shape, colour: the image's shape and colour derived from its questions (None when its
            questions do not determine it).
    """

    image_id: int
    path: str
    questions: list[tuple[str, str]] = field(default_factory=list)
    shape: str | None = None
    colour: str | None = None


def _derive_attributes(item: Item) -> None:
    """Fill ``item.shape`` and ``item.colour`` from what its questions and answers state."""
    shape_no: set[str] = set()
    colour_no: set[str] = set()
    for q, a in item.questions:
        words = _WORD.findall(q)
        mentioned_shape = next((w for w in words if w in SHAPES), None)
        mentioned_colour = next((w for w in words if w in COLOURS), None)
        if a in SHAPES:
            item.shape = a
            if mentioned_colour:
                item.colour = mentioned_colour
        elif a in COLOURS:
            item.colour = a
            if mentioned_shape:
                item.shape = mentioned_shape
        else:
            truth = (a == "yes") != is_negated(q, a)
            for word, no_set, attr in ((mentioned_shape, shape_no, "shape"), (mentioned_colour, colour_no, "colour")):
                if word is None:
                    continue
                if truth:
                    setattr(item, attr, word)
                else:
                    no_set.add(word)
    if item.shape is None and len(shape_no) == len(SHAPES) - 1:
        item.shape = next(s for s in SHAPES if s not in shape_no)
    if item.colour is None and len(colour_no) == len(COLOURS) - 1:
        item.colour = next(c for c in COLOURS if c not in colour_no)


def load_split(split: str) -> list[Item]:
    """Load one easy-VQA split (``"train"``: 4,000 images; ``"test"``: 1,000) with its questions.

    Raises:
        ImportError: ``easy-vqa`` is not installed (``pip install 'lightkv[train]'``).
        ValueError: unknown split.
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("retraining the demo model needs the easy-vqa dataset: pip install 'lightkv[train]'") from exc
    if split == "train":
        questions, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    items = {i: Item(i, paths[i]) for i in sorted(paths)}
    for q, a, i in zip(questions, answers, ids):
        items[i].questions.append((q, a))
    out = [items[i] for i in sorted(items)]
    for item in out:
        _derive_attributes(item)
    return out


@dataclass
class Canvas:
    """One placed image.

    Attributes:
        image: the ``CANVAS``×``CANVAS`` RGB image.
        object_fraction: ``(16, 16)`` float32, fraction of each 8×8 patch covered by the object.
        side: side in pixels of the pasted easy-VQA image (``CANVAS`` when full-frame).
        x, y: its top-left corner on the canvas.
    """

    image: Image.Image
    object_fraction: np.ndarray
    side: int
    x: int
    y: int


def placement(seed: int, split: str, image_id: int, variant: int) -> tuple[int, int, int]:
    """``(side, x, y)`` of image ``image_id`` of ``split`` in ``variant``, deterministic in all four."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], image_id, variant])
    if rng.random() < FULL_FRAME_P:
        return CANVAS, 0, 0
    side = int(rng.integers(SCALE_RANGE[0], SCALE_RANGE[1] + 1))
    x = int(rng.integers(0, CANVAS - side + 1))
    y = int(rng.integers(0, CANVAS - side + 1))
    return side, x, y


_SOURCE_CACHE: dict[str, tuple[Image.Image, Image.Image]] = {}


def _source(path: str) -> tuple[Image.Image, Image.Image]:
    """The easy-VQA image at ``path`` (RGB) and its object mask (mode ``L``, 255 = object); cached."""
    got = _SOURCE_CACHE.get(path)
    if got is None:
        with Image.open(path) as im:
            src = im.convert("RGB")
        bg = np.asarray(src.getpixel((0, 0)), dtype=np.int32)
        diff = np.abs(np.asarray(src, dtype=np.int32) - bg).sum(-1)
        mask = Image.fromarray((diff > OBJECT_THRESHOLD).astype(np.uint8) * 255)
        got = _SOURCE_CACHE[path] = (src, mask)
    return got


def make_canvas(path: str, side: int, x: int, y: int) -> Canvas:
    """Paste the easy-VQA image at ``path``, resized to ``side``×``side``, at ``(x, y)`` on a canvas
    filled with the image's background tint (its top-left pixel), and measure per-patch object cover.
    """
    src, mask = _source(path)
    bg = src.getpixel((0, 0))
    canvas = Image.new("RGB", (CANVAS, CANVAS), bg)
    canvas.paste(src.resize((side, side), Image.BILINEAR), (x, y))
    full = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    scaled = np.asarray(mask.resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
    full[y : y + side, x : x + side] = scaled
    g = CANVAS // PATCH
    frac = full.reshape(g, PATCH, g, PATCH).mean(axis=(1, 3))
    return Canvas(canvas, frac.astype(np.float32), side, x, y)


def canvas_for(item: Item, seed: int, split: str, variant: int) -> Canvas:
    """The canvas of ``item`` in ``variant`` (see :func:`placement`)."""
    side, x, y = placement(seed, split, item.image_id, variant)
    return make_canvas(item.path, side, x, y)


def vocabulary(items: list[Item]) -> list[str]:
    """Sorted lower-case words and punctuation of the questions and answers of ``items``."""
    words: set[str] = set()
    for item in items:
        for q, a in item.questions:
            words.update(re.findall(r"\w+|[^\w\s]+", q.lower()))
            words.add(a)
    return sorted(words)


def stratified_subset(items: list[Item], n: int, seed: int) -> list[tuple[Item, str, str]]:
    """A fixed subset of ``n`` test questions, one per image, stratified by question type.

    A quarter are shape questions, a quarter colour questions and half yes/no questions (yes/no
    are 74% of easy-VQA, so the subset over-weights the questions that need the image).

    Returns:
        ``(item, question, answer)`` triples, ordered by image id.
    """
    rng = np.random.default_rng([seed, 7])
    quota = {"shape": n // 4, "colour": n // 4}
    quota["yes/no"] = n - quota["shape"] - quota["colour"]
    order = rng.permutation(len(items))
    chosen: list[tuple[Item, str, str]] = []
    for idx in order:
        item = items[int(idx)]
        qs = list(item.questions)
        for j in rng.permutation(len(qs)):
            q, a = qs[int(j)]
            t = question_type(q, a)
            if quota[t] > 0:
                quota[t] -= 1
                chosen.append((item, q, a))
                break
        if not any(quota.values()):
            break
    return sorted(chosen, key=lambda c: c[0].image_id)
