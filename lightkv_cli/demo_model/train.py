"""Train the embedded easy-VQA demo model from scratch, evaluate it, and write its checkpoint.

One cohesive script (the recipe's three stages, its evaluation and the model card read as one
story), kept beside the model it builds and off the profiler's runtime path: nothing in lightkv
imports it.

Usage::

    pip install 'lightkv[train]'            # the easy-vqa dataset
    python -m lightkv_cli.demo_model.train [--seed 0] [--output DIR] [--device cpu]

Recipe (see ``build.py`` for the architecture and ``data.py`` for the canvas task):

1. **Vision pretraining.** The vision tower (two CLIP encoder layers) and the projector learn
   per-token labels on training canvases: every token the object covers (≥ ``OBJECT_COVER`` of its
   patch) learns the object's colour and shape, every token the object does not touch learns
   "background" (object and background tokens weigh the same in the loss), plus the shape from the
   mean of the object's tokens. Labels come from the training questions (which state each image's
   shape and colour) and the object mask. The encoder layers let an object token see its
   neighbours, so it can tell the shape. Labels alone only teach background tokens to *say*
   "background" (the previous model's background tokens still carried the shape), so a second loss
   makes every background token come out of the tower as it does on the same canvas without the
   object (``--background-invariance``).
2. **Answers** (the vision tower frozen from here on, so the answer loss cannot spread the object
   into every token): the projector and decoder learn to answer, loss on the answer word and the
   end-of-sequence token after the LLaVA prompt ``USER: <image>\\n{question} ASSISTANT:``. Every
   epoch places each training image anew (augmentation) and adds ``--contrast`` yes/no questions per
   image with balanced answers (half name the image's own colour or shape). The vision prefix does not
   depend on the question (causal attention), so it is computed once per image and its KV cache is
   shared by the image's questions (the same function as running every question on its own). For
   speed this stage runs the decoder on ``--train-tokens`` of the 256 vision tokens (all the object's
   tokens plus random background ones, at their original positions).

   Yes/no answers are ``match XOR negated``: a third-order function of the word the question names,
   the image and the negation, and plain answer loss never started to learn it (the previous model
   stayed at the question-only baseline). Auxiliary linear probes on the hidden state *at the named
   word* break it into steps that each get a direct signal (``match_targets``): at layer L/4 the
   image's colour and shape, at L/2 whether the word matches them and whether the question is
   negated, at 3L/4 the answer. The final position then only has to copy the answer. The probes
   are discarded; the saved model is a plain LLaVA.
3. Stage 3: a pass over all 256 tokens, so that the model sees full-length prompts.
4. **Evaluation** on the whole test split (1,000 images, 9,673 questions, never trained on) by greedy
   ``generate()`` through the saved processor with exact match; by question type; against a
   question-only baseline; and per-token dependence checks (vision tokens removed before the decoder).

Deterministic from ``--seed`` on a given machine and thread count (``torch.set_num_threads``).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import platform
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lightkv_cli.demo_model import CHECKPOINT_DIR, TESTSET_DIR, build, data
from lightkv_cli.methods.hf_compat import cache_kwarg, output_cache

N_VISION = (data.CANVAS // data.PATCH) ** 2  # 256
#: A vision token is labelled with the object's colour and shape in vision pretraining when the object
#: covers at least this fraction of its patch; tokens the object does not touch are labelled background.
OBJECT_COVER = 0.2
#: Prompt tokens before the image placeholders: ``<s> user :``.
N_HEAD = 3


def log(msg: str) -> None:
    """Print a progress line with a wall-clock stamp."""
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ------------------------------------------------------------------------------------------------
# tensors
# ------------------------------------------------------------------------------------------------
_MEAN = torch.tensor(build.CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(build.CLIP_STD).view(3, 1, 1)


def pixels(images) -> torch.Tensor:
    """``(B, 3, 128, 128)`` float32 pixel values of 128×128 RGB PIL images, normalised exactly as
    the saved ``CLIPImageProcessor`` does (rescale to [0, 1], CLIP mean/std)."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    return (x - _MEAN) / _STD


class Encoder:
    """Token ids of the prompt pieces (the same ids the processor produces, checked in ``check``)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.head = tokenizer("USER:", add_special_tokens=True)["input_ids"]
        assert len(self.head) == N_HEAD, self.head
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self._cache: dict[str, list[int]] = {}

    def suffix(self, question: str) -> list[int]:
        """Ids of ``{question} ASSISTANT:`` (what follows the image placeholders)."""
        got = self._cache.get(question)
        if got is None:
            got = self._cache[question] = self.tok(question + " ASSISTANT:", add_special_tokens=False)["input_ids"]
        return got

    def answer(self, answer: str) -> int:
        """The single token of an answer word."""
        return self.tok.convert_tokens_to_ids(answer)


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(B, 256, D)`` projected vision tokens, exactly what LLaVA scatters into the placeholders."""
    feats = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    return feats


def prefix_cache(
    model, enc: Encoder, feats: torch.Tensor, keep: torch.Tensor | None = None, keep_positions: bool = False
):
    """Run the decoder on ``<s> user : <image tokens>`` and return its ``DynamicCache``.

    Args:
        feats: ``(B, 256, D)`` projected vision tokens.
        keep: optional ``(B, n)`` long indices of the vision tokens to keep (drop the others before
            the decoder); all rows keep the same number.
        keep_positions: False: the kept tokens are renumbered contiguously (a shorter prompt);
            True: they keep their original positions (training on a subset of the tokens, as if the
            others were there), and the suffix must then start at position ``3 + 256``.

    Returns:
        ``(cache, next_position)``: the position of the first suffix token.
    """
    lm = model.model.language_model
    B = feats.shape[0]
    head = lm.embed_tokens(torch.tensor(enc.head, device=feats.device)).unsqueeze(0).expand(B, -1, -1)
    position_ids = None
    if keep is not None:
        feats = torch.gather(feats, 1, keep.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        if keep_positions:
            head_pos = torch.arange(N_HEAD, device=feats.device).expand(B, -1)
            position_ids = torch.cat([head_pos, N_HEAD + keep], dim=1)
    x = torch.cat([head, feats.to(head.dtype)], dim=1)
    out = lm(inputs_embeds=x, position_ids=position_ids, use_cache=True)
    return output_cache(out), (N_HEAD + N_VISION if position_ids is not None else x.shape[1])


def suffix_logits(
    model,
    cache,
    rows: torch.Tensor,
    suffix_ids: torch.Tensor,
    start: int | None = None,
    hidden_layers: tuple[int, ...] = (),
):
    """Logits ``(Q, T, V)`` of right-padded suffixes ``(Q, T)`` continuing prefix ``rows[q]`` of ``cache``;
    the suffix starts at position ``start`` (default: right after the cached tokens). With
    ``hidden_layers`` returns ``(logits, [hidden, ...])``, each ``(Q, T, D)`` the output of that decoder
    layer (1-based; the last layer's after the final norm, as transformers returns it)."""
    from transformers import DynamicCache

    lm = model.model.language_model
    expanded = DynamicCache()
    for i, layer in enumerate(cache.layers):
        expanded.update(layer.keys[rows], layer.values[rows], i)
    position_ids = None
    if start is not None:
        position_ids = (start + torch.arange(suffix_ids.shape[1], device=suffix_ids.device)).expand(
            suffix_ids.shape[0], -1
        )
    out = lm(
        inputs_embeds=lm.embed_tokens(suffix_ids),
        **cache_kwarg(lm.forward, expanded),
        position_ids=position_ids,
        use_cache=True,
        output_hidden_states=bool(hidden_layers),
    )
    logits = model.lm_head(out.last_hidden_state)
    if not hidden_layers:
        return logits
    return logits, [out.hidden_states[i] for i in hidden_layers]


def training_keep(canvases, n_keep: int, rng) -> torch.Tensor:
    """``(B, n_keep)`` sorted indices of the vision tokens used for one training step: every token the
    object touches (a random ``n_keep`` of them if there are more) and random background tokens."""
    rows = []
    for c in canvases:
        touched = np.nonzero(c.object_fraction.reshape(-1) > 0)[0]
        if len(touched) >= n_keep:
            chosen = rng.choice(touched, size=n_keep, replace=False)
        else:
            rest = np.nonzero(c.object_fraction.reshape(-1) <= 0)[0]
            chosen = np.concatenate([touched, rng.choice(rest, size=n_keep - len(touched), replace=False)])
        rows.append(np.sort(chosen))
    return torch.from_numpy(np.stack(rows)).long()


def pad_right(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, T)`` right-padded ids and ``(Q,)`` lengths."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def epoch_canvases(items, seed: int, split: str, variant: int):
    return [data.canvas_for(it, seed, split, variant) for it in items]


def background_change(feats: torch.Tensor, feats_empty: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """How much the object changes the tokens it does not touch: the mean over ``background`` tokens of
    ``|f - f_empty|² / |f_empty|²``.

    Args:
        feats: ``(B, 256, D)`` vision tokens of the canvases.
        feats_empty: ``(B, 256, D)`` vision tokens of the same canvases without the object.
        background: ``(B, 256)`` bool, the tokens the object does not touch.

    Returns:
        A scalar tensor (0 when no background token changes; 0 when there is no background token).
    """
    diff = ((feats - feats_empty) ** 2).sum(-1) / (feats_empty**2).sum(-1).clamp(min=1e-6)
    return (diff * background).sum() / background.sum().clamp(min=1)


def pretrain_vision(
    model, items, seed: int, epochs: int, lr: float, batch: int, device, background_invariance: float = 0.0
) -> None:
    """Stage 1: per-token colour/shape labels and a pooled shape label (see module docstring).

    Args:
        background_invariance: weight of a loss that makes every token the object does not touch
            come out of the tower as they do on the same canvas without the object (squared
            difference relative to the feature's squared norm; the object-free features are the
            target, no gradient through them). The labels alone only teach those
            tokens to *say* "background"; without this they still carried the shape (the encoder's
            attention reads the object from anywhere), so no token reduction could remove it.
    """
    dim = model.config.text_config.hidden_size
    heads = torch.nn.ModuleDict(
        {
            "colour": torch.nn.Linear(dim, 1 + len(data.COLOURS)),
            "shape": torch.nn.Linear(dim, 1 + len(data.SHAPES)),
            "pooled": torch.nn.Linear(dim, len(data.SHAPES)),
        }
    ).to(device)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=lr, weight_decay=0.01)
    colour_of = {c: i + 1 for i, c in enumerate(data.COLOURS)}
    shape_of = {s: i + 1 for i, s in enumerate(data.SHAPES)}
    rng = np.random.default_rng([seed, 101])
    steps = epochs * math.ceil(len(items) / batch)
    step = 0
    for ep in range(epochs):
        canv = epoch_canvases(items, seed, "train", 1000 + ep)
        order = rng.permutation(len(items))
        stats = collections.Counter()
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            px = pixels([canv[i].image for i in idx]).to(device)
            frac = torch.from_numpy(np.stack([canv[i].object_fraction.reshape(-1) for i in idx])).to(device)
            col = torch.tensor([colour_of.get(items[i].colour, -100) for i in idx], device=device)
            shp = torch.tensor([shape_of.get(items[i].shape, -100) for i in idx], device=device)
            obj = frac >= OBJECT_COVER
            bg = frac <= 0.0
            col_t = torch.where(obj, col[:, None], torch.where(bg, 0, -100))
            col_t = torch.where(obj & (col[:, None] < 0), -100, col_t)
            shp_t = torch.where(obj, shp[:, None], torch.where(bg, 0, -100))
            shp_t = torch.where(obj & (shp[:, None] < 0), -100, shp_t)
            if background_invariance:
                empty = [Image.new("RGB", (data.CANVAS, data.CANVAS), canv[i].image.getpixel((0, 0))) for i in idx]
                with torch.no_grad():
                    feats_empty = vision_features(model, pixels(empty).to(device))
                feats = vision_features(model, px)
                loss_inv = background_change(feats, feats_empty, bg)
            else:
                feats = vision_features(model, px)  # (B, 256, D)
            # Object and background tokens weigh the same in total (the object covers ~5% of the tokens).
            is_obj = obj.flatten().float()
            is_bg = bg.flatten().float()
            token_w = is_obj / is_obj.sum().clamp(min=1) + is_bg / is_bg.sum().clamp(min=1)
            colour_logits, shape_logits = heads["colour"](feats), heads["shape"](feats)
            loss_c = (
                F.cross_entropy(colour_logits.flatten(0, 1), col_t.flatten(), ignore_index=-100, reduction="none")
                * token_w
            ).sum() / 2
            loss_s = (
                F.cross_entropy(shape_logits.flatten(0, 1), shp_t.flatten(), ignore_index=-100, reduction="none")
                * token_w
            ).sum() / 2
            w = (frac > 0.02).float()
            pooled = (feats * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
            loss_p = F.cross_entropy(heads["pooled"](pooled), torch.where(shp > 0, shp - 1, -100), ignore_index=-100)
            loss = loss_c + loss_s + loss_p
            if background_invariance:
                loss = loss + background_invariance * loss_inv
                stats["inv"] += float(loss_inv) * len(idx)
            warmup = min(100, steps // 10)
            for g in opt.param_groups:
                g["lr"] = (
                    lr * (step + 1) / warmup
                    if step < warmup
                    else lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            with torch.no_grad():
                pred = heads["pooled"](pooled).argmax(-1)
                ok = shp > 0
                stats["pooled_ok"] += int((pred[ok] == shp[ok] - 1).sum())
                stats["pooled_n"] += int(ok.sum())
                tok_ok = shp_t > 0
                shape_pred = shape_logits.argmax(-1)
                stats["token_shape_ok"] += int((shape_pred[tok_ok] == shp_t[tok_ok]).sum())
                stats["token_colour_ok"] += int((colour_logits.argmax(-1)[tok_ok] == col_t[tok_ok]).sum())
                stats["token_n"] += int(tok_ok.sum())
                bg_t = shp_t == 0
                stats["bg_ok"] += int((shape_pred[bg_t] == 0).sum())
                stats["bg_n"] += int(bg_t.sum())
                stats["loss"] += float(loss) * len(idx)
                stats["n"] += len(idx)
        log(
            f"vision pretrain epoch {ep + 1}/{epochs}: loss {stats['loss'] / stats['n']:.3f}, "
            f"pooled shape acc {stats['pooled_ok'] / max(1, stats['pooled_n']):.3f}, object tokens: shape acc "
            f"{stats['token_shape_ok'] / max(1, stats['token_n']):.3f}, colour acc "
            f"{stats['token_colour_ok'] / max(1, stats['token_n']):.3f}; "
            f"background tokens called background {stats['bg_ok'] / max(1, stats['bg_n']):.4f}"
            + (f"; background change from the object {stats['inv'] / stats['n']:.4f}" if background_invariance else "")
        )


def yes_no_templates(items) -> list[tuple[str, str, bool]]:
    """The easy-VQA yes/no question templates seen in ``items``: ``(template, attribute, negated)``
    with the colour or shape word replaced by ``{}`` (e.g. ``("is there not a {} shape?", "colour",
    True)``), sorted."""
    found = set()
    for it in items:
        for q, a in it.questions:
            if a not in ("yes", "no"):
                continue
            words = data._WORD.findall(q)
            for attr, names in (("colour", data.COLOURS), ("shape", data.SHAPES)):
                hit = [w for w in words if w in names]
                if len(hit) == 1:
                    found.add((re.sub(rf"\b{hit[0]}\b", "{}", q), attr, data.is_negated(q, a)))
    return sorted(found)


def contrast_questions(item, templates, k: int, rng) -> list[tuple[str, str]]:
    """``k`` yes/no questions about ``item`` built from ``templates`` with exactly balanced answers:
    half name the image's own colour or shape, half another one (negated templates flip the answer).
    Training-split labels only; none when the item's colour or shape is unknown.

    easy-VQA's own yes/no questions are 82.5% answerable from the text alone, and the model trained on
    them never learned to compare the word in the question with the image. Asking the same image
    about its own and another colour gives that comparison a direct signal.
    """
    out = []
    if item.colour is None or item.shape is None or k <= 0:
        return out
    for j in range(k):
        template, attr, negated = templates[int(rng.integers(len(templates)))]
        names = data.COLOURS if attr == "colour" else data.SHAPES
        own = getattr(item, attr)
        value = own if j % 2 == 0 else str(rng.choice([n for n in names if n != own]))
        out.append((template.format(value), "yes" if (value == own) != negated else "no"))
    return out


def questions_for_epoch(item, seed: int, epoch: int, k: int) -> list[tuple[str, str]]:
    """``k`` of the image's questions for ``epoch`` (all when ``k`` ≤ 0): a fixed per-image order,
    cycled, so that successive epochs see different questions."""
    qs = item.questions
    if k <= 0 or k >= len(qs):
        return list(qs)
    order = np.random.default_rng([seed, 303, item.image_id]).permutation(len(qs))
    return [qs[int(order[(epoch * k + j) % len(qs)])] for j in range(k)]


def match_targets(enc: Encoder, seqs: list[list[int]], qa: list[tuple[str, str]]):
    """Targets of the auxiliary match probe for one step.

    For every yes/no question in ``qa`` (``(question, answer)``, aligned with the token sequences
    ``seqs``), the position in its suffix of the colour or shape word it names and whether that word
    matches the image: ``(answer == "yes") XOR negated``. Comparing the named word with the image is
    a second-order function of the two (and, through negation, the answer is a third-order one), which
    plain answer loss on a balanced set never started to learn; the probe gives the comparison a direct
    signal where the word is, and the answer is then its XOR with the negation.

    Returns:
        ``(which, positions, targets, negated)``: ``(M,)`` long row indices, ``(M,)`` long token
        positions, ``(M,)`` float32 0/1 match targets, ``(M,)`` float32 0/1 "the question is negated".
    """
    names = set(data.COLOURS) | set(data.SHAPES)
    ids = {enc.tok.convert_tokens_to_ids(n): n for n in names}
    which, positions, targets, negated = [], [], [], []
    for r, ((q, a), seq) in enumerate(zip(qa, seqs)):
        if a not in ("yes", "no"):
            continue
        hit = [j for j, t in enumerate(seq[:-1]) if t in ids]
        if len(hit) != 1:
            continue
        which.append(r)
        positions.append(hit[0])
        neg = data.is_negated(q, a)
        targets.append(float((a == "yes") != neg))
        negated.append(float(neg))
    return (
        torch.tensor(which, dtype=torch.long),
        torch.tensor(positions, dtype=torch.long),
        torch.tensor(targets),
        torch.tensor(negated),
    )


def balanced_weights(items) -> dict[tuple[str, str], float]:
    """Loss weight of each ``(question, answer)`` pair: ``1 / (K · P(answer | question))`` over the
    training questions, with ``K`` the number of answers seen for that exact question, then scaled to
    mean 1 over the training questions.

    easy-VQA's question text alone predicts most yes/no answers ("is there a brown shape?" is "no"
    for 90% of images), and an unweighted model settles on that prior and never reads the image for
    them (its yes/no accuracy equalled the question-only baseline, 82.5%, to four digits). With these
    weights every answer to a question weighs the same in total, so the prior no longer lowers the
    loss and only the image does.
    """
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for it in items:
        for q, a in it.questions:
            counts[q][a] += 1
    raw = {}
    for q, c in counts.items():
        total = sum(c.values())
        for a, n in c.items():
            raw[(q, a)] = total / (len(c) * n)
    n_all = sum(sum(c.values()) for c in counts.values())
    mean = sum(raw[(q, a)] * n for q, c in counts.items() for a, n in c.items()) / n_all
    return {k: v / mean for k, v in raw.items()}


def train_full(
    model,
    enc: Encoder,
    items,
    seed: int,
    epochs: int,
    lr: float,
    batch: int,
    device,
    questions_per_image: int = 0,
    balanced: bool = True,
    stage: int = 2,
    train_tokens: int = 0,
    contrast: int = 0,
    affirmative_epochs: int = 0,
    match_aux: float = 0.0,
) -> None:
    """Stages 2 and 3: the whole model on the answers (answer word + end-of-sequence token).

    Args:
        balanced: weight each answer by :func:`balanced_weights` (stage 2); False: plain
            cross-entropy (stage 3, where the model also learns the question prior).
        stage: selects the canvas variants and data order, so stages see different placements.
        train_tokens: when > 0, each step runs the decoder on this many of the 256 vision tokens (all
            the object's tokens plus random background ones, at their original positions): ~2.5×
            cheaper on a CPU; 0 = all tokens.
        contrast: extra yes/no questions per image from :func:`contrast_questions` (0: none).
        affirmative_epochs: leave the negated yes/no questions out of the first this many epochs.
        match_aux: weight of the auxiliary probes at the colour or shape word a yes/no question names
            (:func:`match_targets`; 0: off): the image's colour and shape at decoder layer L/4, whether
            the word matches them and whether the question is negated at L/2, the answer at 3L/4.
            The probes are discarded after training.
    """
    weight_of = balanced_weights(items) if balanced else collections.defaultdict(lambda: 1.0)
    templates = yes_no_templates(items)
    # The vision tower stays as stage 1 left it: trained only on per-token labels, its tokens carry
    # their own patch's object (and background tokens say "background"). Letting the answer loss reach
    # it would teach it to spread the object into every token, which no token reduction can then hurt.
    model.model.vision_tower.requires_grad_(False)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    n_layers = model.config.text_config.num_hidden_layers
    aux_layers = (n_layers // 4, n_layers // 2, (3 * n_layers) // 4)
    if match_aux:
        dim = model.config.text_config.hidden_size
        probes = torch.nn.ModuleDict(
            {
                "match": torch.nn.Linear(dim, 1),
                "negated": torch.nn.Linear(dim, 1),
                "answer": torch.nn.Linear(dim, 1),
                "colour": torch.nn.Linear(dim, len(data.COLOURS)),
                "shape": torch.nn.Linear(dim, len(data.SHAPES)),
            }
        ).to(device)
        decay += list(probes.parameters())
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    rng = np.random.default_rng([seed, 202] if stage == 2 else [seed, 202, stage])
    per_epoch = math.ceil(len(items) / batch)
    steps, warmup = epochs * per_epoch, min(200, epochs * per_epoch // 10)
    step = 0
    t0 = time.time()
    for ep in range(epochs):
        canv = epoch_canvases(items, seed, "train", ep if stage == 2 else 100 * stage + ep)
        order = rng.permutation(len(items))
        run = collections.Counter()
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            px = pixels([canv[i].image for i in idx]).to(device)
            rows, seqs, weights, answers = [], [], [], []
            for r, i in enumerate(idx):
                real = questions_for_epoch(items[i], seed, ep, questions_per_image)
                extra = contrast_questions(items[i], templates, contrast, rng)
                if ep < affirmative_epochs:
                    real = [(q, a) for q, a in real if not data.is_negated(q, a)]
                    extra = [(q, a) for q, a in extra if not data.is_negated(q, a)]
                for n_q, (q, a) in enumerate(real + extra):
                    answers.append((q, a))
                    rows.append(r)
                    seqs.append(enc.suffix(q) + [enc.answer(a)])
                    weights.append(weight_of[(q, a)] if n_q < len(real) else 1.0)
            ids, lens = pad_right(seqs, enc.pad)
            ids, lens = ids.to(device), lens.to(device)
            rows_t = torch.tensor(rows, device=device)
            feats = vision_features(model, px)
            keep = training_keep([canv[i] for i in idx], train_tokens, rng).to(device) if train_tokens else None
            cache, start = prefix_cache(model, enc, feats, keep, keep_positions=True)
            ar = torch.arange(len(seqs), device=device)
            ans_pos = lens - 2  # the ":" of "ASSISTANT:" predicts the answer
            w = torch.tensor(weights, device=device)
            if match_aux:
                logits, (h_seen, h_match, h_answer) = suffix_logits(
                    model, cache, rows_t, ids, start, hidden_layers=aux_layers
                )
            else:
                logits = suffix_logits(model, cache, rows_t, ids, start)  # (Q, T, V)
            loss_a = (F.cross_entropy(logits[ar, ans_pos], ids[ar, lens - 1], reduction="none") * w).sum() / w.sum()
            loss_e = F.cross_entropy(logits[ar, lens - 1], torch.full_like(lens, enc.eos))
            loss = loss_a + 0.5 * loss_e
            if match_aux:
                which, pos, target, negated = match_targets(enc, seqs, answers)
                if len(which):
                    which, pos, target, negated = (
                        which.to(device),
                        pos.to(device),
                        target.to(device),
                        negated.to(device),
                    )
                    z = probes["match"](h_match[which, pos]).squeeze(-1)
                    z_answer = probes["answer"](h_answer[which, pos]).squeeze(-1)
                    truth = (target != negated).float()
                    loss_m = (
                        F.binary_cross_entropy_with_logits(z, target)
                        + F.binary_cross_entropy_with_logits(
                            probes["negated"](h_match[which, pos]).squeeze(-1), negated
                        )
                        + F.binary_cross_entropy_with_logits(z_answer, truth)
                    )
                    run["p_ok"] += int(((z_answer > 0).float() == truth).sum())
                    seen = h_seen[which, pos]
                    imaged = [items[idx[rows[r]]] for r in which.tolist()]
                    col = torch.tensor(
                        [data.COLOURS.index(it.colour) if it.colour else -100 for it in imaged], device=device
                    )
                    shp = torch.tensor(
                        [data.SHAPES.index(it.shape) if it.shape else -100 for it in imaged], device=device
                    )
                    loss_r = F.cross_entropy(probes["colour"](seen), col, ignore_index=-100) + F.cross_entropy(
                        probes["shape"](seen), shp, ignore_index=-100
                    )
                    loss = loss + match_aux * (loss_m + loss_r)
                    run["m_ok"] += int(((z > 0).float() == target).sum())
                    run["m_n"] += len(which)
            lr_now = (
                lr * (step + 1) / warmup
                if step < warmup
                else lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
            )
            for g in opt.param_groups:
                g["lr"] = lr_now
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decay + no_decay, 1.0)
            opt.step()
            step += 1
            with torch.no_grad():
                hit = (logits[ar, ans_pos].argmax(-1) == ids[ar, lens - 1]).tolist()
                run["ok"] += sum(hit)
                run["n"] += len(seqs)
                for h, (_, a) in zip(hit, answers):
                    kind = "yn" if a in ("yes", "no") else "attr"
                    run[f"{kind}_ok"] += h
                    run[f"{kind}_n"] += 1
                run["loss"] += float(loss_a) * len(seqs)
            if step % 50 == 0 or s + batch >= len(order):
                log(
                    f"stage {stage} epoch {ep + 1}/{epochs} step {step}/{steps}: answer loss "
                    f"{run['loss'] / run['n']:.4f}, "
                    f"train acc {run['ok'] / run['n']:.4f} (yes/no {run['yn_ok'] / max(1, run['yn_n']):.3f}, "
                    "shape/colour "
                    f"{run['attr_ok'] / max(1, run['attr_n']):.3f})"
                    + (
                        f", probes at the word: match {run['m_ok'] / max(1, run['m_n']):.3f}, answer "
                        f"{run['p_ok'] / max(1, run['m_n']):.3f}"
                        if match_aux
                        else ""
                    )
                    + f", lr {lr_now:.2e}, {time.time() - t0:.0f}s"
                )
                run = collections.Counter()


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    return " ".join(text.lower().replace("?", " ").replace(".", " ").split())


@torch.no_grad()
def generate_answers(model, processor, images, questions, batch: int = 48, device="cpu") -> list[str]:
    """Greedy ``generate()`` answers through the saved processor (the path every user takes)."""
    out: list[str] = []
    tok = processor.tokenizer
    for s in range(0, len(questions), batch):
        texts = [build.prompt_text(q) for q in questions[s : s + batch]]
        inputs = processor(images=images[s : s + batch], text=texts, return_tensors="pt", padding=True).to(device)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        new = gen[:, inputs["input_ids"].shape[1] :]
        out.extend(tok.batch_decode(new, skip_special_tokens=True))
    return out


def by_type(records) -> dict:
    """Accuracy overall and per question type from ``(type, correct)`` records."""
    res = {"overall": float(np.mean([c for _, c in records])), "n": len(records)}
    for t in data.QUESTION_TYPES:
        got = [c for tt, c in records if tt == t]
        res[t] = float(np.mean(got)) if got else None
        res[f"n_{t}"] = len(got)
    return res


@torch.no_grad()
def first_token_eval(model, enc: Encoder, items, canvases, keep_fn=None, device="cpu", batch: int = 25) -> dict:
    """Accuracy of the first answer token (argmax) with vision tokens removed before the decoder.

    ``keep_fn(canvas, rng) -> (n,) long`` picks the vision tokens kept for one image (all 256 when
    None). Images with equal kept counts are batched. The answer is one word and the model ends it
    with the end-of-sequence token, so this equals greedy exact match up to that second token.
    """
    rng = np.random.default_rng(12345)
    keeps = [None if keep_fn is None else keep_fn(c, rng) for c in canvases]
    groups = collections.defaultdict(list)
    for i, k in enumerate(keeps):
        groups[N_VISION if k is None else len(k)].append(i)
    records = []
    for n_keep, members in sorted(groups.items()):
        for s in range(0, len(members), batch):
            idx = members[s : s + batch]
            if n_keep == 0:
                feats = torch.zeros(len(idx), 0, model.config.text_config.hidden_size, device=device)
                keep = torch.zeros(len(idx), 0, dtype=torch.long, device=device)
            else:
                feats = vision_features(model, pixels([canvases[i].image for i in idx]).to(device))
                keep = (
                    None if keeps[idx[0]] is None else torch.stack([torch.as_tensor(keeps[i]) for i in idx]).to(device)
                )
            cache, start = prefix_cache(model, enc, feats, keep, keep_positions=True)
            rows, seqs, meta = [], [], []
            for r, i in enumerate(idx):
                for q, a in items[i].questions:
                    rows.append(r)
                    seqs.append(enc.suffix(q))
                    meta.append((data.question_type(q, a), enc.answer(a)))
            ids, lens = pad_right(seqs, enc.pad)
            logits = suffix_logits(model, cache, torch.tensor(rows, device=device), ids.to(device), start)
            pred = logits[torch.arange(len(seqs)), lens.to(device) - 1].argmax(-1).tolist()
            records.extend((t, float(p == a)) for (t, a), p in zip(meta, pred))
    return by_type(records)


def keep_random(fraction: float):
    """Keep a random ``fraction`` of the 256 vision tokens."""

    def fn(canvas, rng):
        n = int(round(fraction * N_VISION))
        return np.sort(rng.choice(N_VISION, size=n, replace=False))

    return fn


def keep_without_object(canvas, rng):
    """Drop every vision token whose patch the object touches (cover > 0)."""
    return np.nonzero(canvas.object_fraction.reshape(-1) <= 0.0)[0]


def keep_object_only(canvas, rng):
    """Keep only the vision tokens whose patch the object touches."""
    return np.nonzero(canvas.object_fraction.reshape(-1) > 0.0)[0]


def question_only_baseline(train_items, test_items) -> dict:
    """Accuracy of answering each test question with its most frequent training answer
    (the best any question-only model can do, up to ties)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    overall = collections.Counter()
    for it in train_items:
        for q, a in it.questions:
            counts[q][a] += 1
            overall[a] += 1
    records = []
    for it in test_items:
        for q, a in it.questions:
            c = counts.get(q) or overall
            records.append((data.question_type(q, a), float(c.most_common(1)[0][0] == a)))
    return by_type(records)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def check_prefix_path(model, processor, enc: Encoder, item, canvas, device) -> float:
    """Max |logit difference| between the shared-prefix path and a plain forward of the processor's
    full prompt (they must agree: same tokens, same function)."""
    q, _ = item.questions[0]
    inputs = processor(images=[canvas.image], text=[build.prompt_text(q)], return_tensors="pt").to(device)
    expected = enc.head + [enc.image_id] * N_VISION + enc.suffix(q)
    assert inputs["input_ids"][0].tolist() == expected, "processor and training tokenisation differ"
    with torch.no_grad():
        ref = model(**inputs).logits[0, -len(enc.suffix(q)) :]
        feats = vision_features(model, pixels([canvas.image]).to(device))
        assert torch.equal(pixels([canvas.image]), inputs["pixel_values"].cpu()), "pixel preprocessing differs"
        cache, _ = prefix_cache(model, enc, feats)
        got = suffix_logits(
            model, cache, torch.tensor([0], device=device), torch.tensor([enc.suffix(q)], device=device)
        )[0]
    return float((ref - got).abs().max())


def write_testset(processor, model, enc, test_items, seed: int, out_dir: Path, n: int, device) -> dict:
    """Write the fixed ``n``-question test subset (PNG canvases + ``prompts.jsonl``) and score it."""
    subset = data.stratified_subset(test_items, n, seed)
    replace_dir(out_dir, "prompts.jsonl")
    (out_dir / "images").mkdir(parents=True)
    images, questions, lines = [], [], []
    for item, q, a in subset:
        canvas = data.canvas_for(item, seed, "test", 0)
        name = f"images/test{item.image_id:04d}.png"
        canvas.image.save(out_dir / name, optimize=True)
        images.append(canvas.image)
        questions.append(q)
        lines.append(json.dumps({"image": name, "question": q, "answer": a, "type": data.question_type(q, a)}))
    (out_dir / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    preds = generate_answers(model, processor, images, questions, device=device)
    records = [(data.question_type(q, a), float(normalise(p) == a)) for (_, q, a), p in zip(subset, preds)]
    return by_type(records)


def check_replaceable(path: Path, marker: str) -> None:
    """Refuse (``SystemExit`` with a one-line message) to later delete ``path`` unless it is absent,
    an empty directory, or a directory this script wrote (it holds ``marker``), and never the current
    directory or one of its parents. Called before training so that a bad path fails in seconds."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise SystemExit(f"refusing to overwrite {path}: it is the current directory, a parent of it, or home")
    if not path.exists():
        return
    if not path.is_dir() or (any(path.iterdir()) and not (path / marker).is_file()):
        raise SystemExit(f"refusing to overwrite {path}: it exists and was not written by this script (no {marker})")


def replace_dir(path: Path, marker: str) -> None:
    """Delete ``path`` after :func:`check_replaceable` accepts it (so it can be rewritten)."""
    check_replaceable(path, marker)
    if path.exists():
        shutil.rmtree(path)


def fmt(res: dict) -> str:
    return " | ".join(
        f"{100 * res[k]:.1f}" if res.get(k) is not None else "–" for k in ("overall", *data.QUESTION_TYPES)
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lightkv_cli.demo_model.train`` (see ``--help``)."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and canvas placement")
    ap.add_argument("--output", type=Path, default=CHECKPOINT_DIR, help="checkpoint directory to (over)write")
    ap.add_argument("--testset", default=str(TESTSET_DIR), help="where to write the fixed test subset ('' to skip)")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (results are deterministic per thread count)")
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--pretrain-batch", type=int, default=16, help="images per vision pretraining step")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--prior-epochs", type=int, default=1, help="stage 3: epochs of plain (unweighted) answer loss")
    ap.add_argument("--prior-lr", type=float, default=5e-4)
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from a checkpoint this script wrote and run only stage 3 (continue a run)",
    )
    ap.add_argument(
        "--evaluate-only",
        action="store_true",
        help="with --init-from: train nothing; re-evaluate that checkpoint and rewrite its metrics and model card "
        "into --output",
    )
    ap.add_argument("--batch-images", type=int, default=12, help="images per step")
    ap.add_argument("--questions-per-image", type=int, default=4, help="questions per image per epoch (0: all)")
    ap.add_argument(
        "--train-tokens",
        type=int,
        default=64,
        help="stage 2 runs the decoder on this many vision tokens per image (the object's + random background, "
        "original positions; 0: all 256); stage 3 always uses all",
    )
    ap.add_argument(
        "--contrast",
        type=int,
        default=4,
        help="extra yes/no questions per image per step with balanced answers, half about the image's own "
        "colour or shape (stages 2-3; 0: none)",
    )
    ap.add_argument(
        "--balanced",
        action="store_true",
        help="stage 2: weight answers by 1/P(answer | question) (the previous recipe; off: plain cross-entropy)",
    )
    ap.add_argument(
        "--affirmative-epochs",
        type=int,
        default=0,
        help="experimental, off in the shipped recipe: stage 2 leaves negated yes/no questions out of its "
        "first N epochs (curriculum)",
    )
    ap.add_argument(
        "--background-invariance",
        type=float,
        default=10.0,
        help="stage 1: weight of the loss that keeps the object out of the tokens it does not touch (0: off)",
    )
    ap.add_argument(
        "--match-aux",
        type=float,
        default=1.0,
        help="stages 2-3: weight of the auxiliary probes at the colour/shape word of yes/no questions "
        "(what the image holds, mid-decoder; does the word match it, half-way) (0: off)",
    )
    ap.add_argument("--train-images", type=int, default=0, help="use only the first N training images (quick runs)")
    ap.add_argument("--eval-images", type=int, default=0, help="evaluate on the first N test images only (quick runs)")
    ap.add_argument("--check-images", type=int, default=300, help="test images used by the token-removal checks")
    ap.add_argument("--subset-size", type=int, default=200)
    args = ap.parse_args(argv)

    if args.evaluate_only and args.init_from is None:
        raise SystemExit("--evaluate-only needs --init-from CHECKPOINT (the checkpoint to re-evaluate)")
    out = Path(args.output)
    testset_dir = Path(args.testset) if args.testset.strip() else None
    check_replaceable(out, "metrics.json")
    check_replaceable(out.with_name(out.name + ".tmp"), "config.json")
    if testset_dir is not None:
        check_replaceable(testset_dir, "prompts.jsonl")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    started = time.time()
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    train_items = data.load_split("train")
    test_items = data.load_split("test")
    if args.train_images:
        train_items = train_items[: args.train_images]
    n_train_q = sum(len(i.questions) for i in train_items)
    log(f"easy-VQA: {len(train_items)} train images / {n_train_q} questions; {len(test_items)} test images")

    previous = None
    if args.init_from is not None:
        if not (args.init_from / "metrics.json").is_file():
            raise SystemExit(f"--init-from {args.init_from}: not a checkpoint written by this script (no metrics.json)")
        previous = json.loads((args.init_from / "metrics.json").read_text())
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from, attn_implementation="sdpa").to(device)
        processor = AutoProcessor.from_pretrained(args.init_from)
        tokenizer, config = processor.tokenizer, model.config
    else:
        tokenizer = build.build_tokenizer(data.vocabulary(train_items))
        config = build.build_config(tokenizer)
        config._attn_implementation = "sdpa"
        model = LlavaForConditionalGeneration(config).to(device)
        processor = build.build_processor(tokenizer, config.vision_config)
    enc = Encoder(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")

    model.train()
    if previous is None:
        t = time.time()
        pretrain_vision(
            model,
            train_items,
            args.seed,
            args.pretrain_epochs,
            args.pretrain_lr,
            args.pretrain_batch,
            device,
            background_invariance=args.background_invariance,
        )
        t_pre = time.time() - t
        t = time.time()
        train_full(
            model,
            enc,
            train_items,
            args.seed,
            args.epochs,
            args.lr,
            args.batch_images,
            device,
            args.questions_per_image,
            balanced=args.balanced,
            train_tokens=args.train_tokens,
            contrast=args.contrast,
            affirmative_epochs=args.affirmative_epochs,
            match_aux=args.match_aux,
        )
        t_full = time.time() - t
    else:  # stages 1-2 (and with --evaluate-only stage 3) come from --init-from
        t_pre = previous["training_seconds"]["vision_pretrain"]
        t_full = previous["training_seconds"]["full_model"]
        keys = [
            "pretrain_epochs",
            "pretrain_lr",
            "pretrain_batch",
            "epochs",
            "lr",
            "batch_images",
            "questions_per_image",
            "train_tokens",
            "train_images",
            "contrast",
            "affirmative_epochs",
            "background_invariance",
            "match_aux",
            "balanced",
        ]
        if args.evaluate_only:
            keys += ["prior_epochs", "prior_lr"]
        for key in keys:
            if key in previous["args"]:
                kind = type(getattr(args, key))
                value = previous["args"][key]
                setattr(args, key, value == "True" if kind is bool else kind(value))
    t = time.time()
    if args.evaluate_only:
        t_prior = previous["training_seconds"]["prior_stage"]
    else:
        if args.prior_epochs:
            train_full(
                model,
                enc,
                train_items,
                args.seed,
                args.prior_epochs,
                args.prior_lr,
                args.batch_images,
                device,
                args.questions_per_image,
                balanced=False,
                stage=3,
                contrast=args.contrast,
                match_aux=args.match_aux,
            )
        t_prior = time.time() - t
    model.eval()
    t_eval_start = time.time()

    tmp = out.with_name(out.name + ".tmp")
    replace_dir(tmp, "config.json")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    model = LlavaForConditionalGeneration.from_pretrained(tmp, attn_implementation="sdpa").to(device).eval()
    processor = AutoProcessor.from_pretrained(tmp)
    eval_items = test_items[: args.eval_images] if args.eval_images else test_items
    canvases = epoch_canvases(eval_items, args.seed, "test", 0)
    diff = check_prefix_path(model, processor, enc, eval_items[0], canvases[0], device)
    log(f"shared-prefix path vs full forward: max |Δlogit| = {diff:.2e}")

    t = time.time()
    images, questions, types, answers, full_frame = [], [], [], [], []
    for it, c in zip(eval_items, canvases):
        for q, a in it.questions:
            images.append(c.image)
            questions.append(q)
            answers.append(a)
            types.append(data.question_type(q, a))
            full_frame.append(c.side == data.CANVAS)
    preds = generate_answers(model, processor, images, questions, device=device)
    records = [(tt, float(normalise(p) == a)) for tt, p, a in zip(types, preds, answers)]
    test = by_type(records)
    by_placement = {
        "full_frame": by_type([r for r, f in zip(records, full_frame) if f]),
        "placed": by_type([r for r, f in zip(records, full_frame) if not f]),
    }
    t_eval = time.time() - t
    log(f"test accuracy by greedy generate (overall | shape | colour | yes/no): {fmt(test)} [{t_eval:.0f}s]")

    checks = {}
    n_check = min(args.check_images or len(eval_items), len(eval_items))
    for name, fn in (
        ("first_token_all_tokens", None),
        ("random_drop_50", keep_random(0.5)),
        ("random_drop_75", keep_random(0.25)),
        ("object_tokens_removed", keep_without_object),
        ("object_tokens_only", keep_object_only),
        ("no_vision_tokens", lambda c, r: np.zeros(0, dtype=np.int64)),
    ):
        checks[name] = first_token_eval(model, enc, eval_items[:n_check], canvases[:n_check], fn, device)
        log(f"{name}: {fmt(checks[name])}")
    cover = [int((c.object_fraction > 0).sum()) for c in canvases]
    baseline = question_only_baseline(train_items, eval_items)
    log(f"question-only baseline (majority answer per question): {fmt(baseline)}")

    subset = None
    if testset_dir is not None:
        subset = write_testset(processor, model, enc, test_items, args.seed, testset_dir, args.subset_size, device)
        log(f"test subset ({args.subset_size} questions): {fmt(subset)}")

    total = time.time() - started
    t_evaluation = time.time() - t_eval_start
    metrics = {
        "schema": "lightkv.demo_model.metrics/1",
        "seed": args.seed,
        "test_accuracy": test,
        "test_accuracy_by_placement": by_placement,
        "subset_accuracy": subset,
        "question_only_baseline": baseline,
        "dependence_checks": checks,
        "dependence_check_images": n_check,
        "object_tokens_per_image": {
            "mean": float(np.mean(cover)),
            "median": float(np.median(cover)),
            "min": int(np.min(cover)),
            "max": int(np.max(cover)),
        },
        "parameters": n_params,
        "training_seconds": {
            "vision_pretrain": round(t_pre, 1),
            "full_model": round(t_full, 1),
            "prior_stage": round(t_prior, 1),
            "evaluation": round(t_evaluation, 1),
            "total": round(t_pre + t_full + t_prior + t_evaluation, 1),
        },
        "continued_from": (
            None if previous is None else previous.get("continued_from") if args.evaluate_only else str(args.init_from)
        ),
        "re_evaluated": bool(args.evaluate_only),
        "device": f"{device.type}: {platform.processor() or platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_images": len(train_items),
        "train_questions": n_train_q,
        "test_images": len(eval_items),
        "test_questions": len(questions),
    }
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (tmp / "MODEL_CARD.md").write_text(model_card(metrics, config, tmp))
    replace_dir(out, "metrics.json")
    tmp.rename(out)
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB) in {total / 60:.1f} min")
    return 0


def model_card(m: dict, config, ckpt: Path) -> str:
    """The Markdown model card of a trained checkpoint."""
    size = sum(f.stat().st_size for f in ckpt.iterdir()) / 1e6
    tc, vc = config.text_config, config.vision_config

    def row(name, r):
        cells = [f"{100 * r[k]:.1f}" if r.get(k) is not None else "–" for k in ("overall", *data.QUESTION_TYPES)]
        return f"| {name} | " + " | ".join(cells) + f" | {r['n']} |"

    c = m["dependence_checks"]
    cov = m["object_tokens_per_image"]
    lines = [
        "# lightkv easy-VQA demo model",
        "",
        "A small LLaVA-architecture model trained from scratch by `python -m lightkv_cli.demo_model.train "
        f"--seed {m['seed']}` so that lightkv's quality columns mean something offline. Not a general model: it "
        "answers easy-VQA questions about one coloured shape on a 128×128 canvas.",
        "",
        "## Data",
        f"easy-VQA 1.0 (PyPI `easy-vqa`, MIT): train split only for training ({m['train_images']} images, "
        f"{m['train_questions']} questions); test split for evaluation ({m['test_images']} images, "
        f"{m['test_questions']} questions). 13 answers (3 shapes, 8 colours, yes/no). Each 64×64 image is "
        f"pasted on a {data.CANVAS}×{data.CANVAS} canvas filled with its own background tint: full-frame with "
        f"probability {data.FULL_FRAME_P}, otherwise resized to {data.SCALE_RANGE[0]}–{data.SCALE_RANGE[1]} px "
        "at a random position, so the answer lives in a few vision tokens. Placement is deterministic from "
        "(seed, split, image, variant); training draws a new variant every epoch; the test set uses variant 0. "
        f"The object touches {cov['median']:.0f} of 256 vision tokens per test image (median; mean "
        f"{cov['mean']:.1f}, range {cov['min']}–{cov['max']}).",
        "",
        "## Architecture",
        f"`LlavaForConditionalGeneration`, {m['parameters'] / 1e6:.2f}M parameters, float32, checkpoint {size:.1f} MB.",
        f"- Vision: CLIP-style, {vc.image_size} px, patch {vc.patch_size} → 16×16 = 256 vision tokens; "
        f"{vc.num_hidden_layers} encoder layers, hidden {vc.hidden_size}, {vc.num_attention_heads} heads. The language "
        f"model reads the last encoder layer (`vision_feature_layer={config.vision_feature_layer}`); CLS dropped "
        '(`vision_feature_select_strategy="default"`). The encoder lets a token see its neighbours (so an object '
        "token can tell the shape); its training (below) keeps the object in the object's own tokens.",
        "- Projector: LLaVA's 2-layer GELU MLP.",
        f"- Decoder: Llama, {tc.num_hidden_layers} layers, hidden {tc.hidden_size}, {tc.num_attention_heads} query "
        f"heads / {tc.num_key_value_heads} key-value heads (GQA), MLP {tc.intermediate_size}, vocabulary "
        f"{tc.vocab_size}.",
        "- Tokenizer: word-level (`tokenizers`) over the easy-VQA vocabulary + `user assistant :` + "
        "`<unk> <s> </s> <pad> <image>`. Prompt: `USER: <image>\\n{question} ASSISTANT:`; answer: one word + `</s>`.",
        "",
        "## Recipe",
        f"1. Vision pretraining ({m['args']['pretrain_epochs']} epochs, lr {m['args']['pretrain_lr']}, "
        f"{m['args'].get('pretrain_batch', '64')} images per step, AdamW, warm-up + cosine): every vision token the "
        f"object covers (≥ {OBJECT_COVER:.0%} of its patch) learns the object's colour (8) and shape (3); every token "
        'the object does not touch learns "background" (object and background tokens weigh the same), plus the '
        "shape from the mean of the object's tokens. Labels come from the training questions and the object mask."
        + (
            f" Background tokens must also come out of the tower as they do on the same canvas without the object "
            f"(relative squared difference, weight {m['args']['background_invariance']}), so that the object's "
            "attributes stay in the object's tokens."
            if float(m["args"].get("background_invariance", 0))
            else ""
        ),
        f"2. Answers ({m['args']['epochs']} epochs, lr {m['args']['lr']}, AdamW, warm-up + cosine, "
        f"{m['args']['batch_images']} images per step, {m['args']['questions_per_image']} of each image's questions "
        "per "
        "epoch, cycling through them; 0 = all"
        + (
            f", plus {m['args']['contrast']} yes/no questions per image with balanced answers, half naming the image's "
            "own colour or shape"
            if int(m["args"].get("contrast", 0))
            else ""
        )
        + "), **vision tower frozen** so the answer loss cannot spread the object into every token: cross-entropy on "
        "the answer word and (×0.5) on `</s>`."
        + (
            " Each answer is weighted by 1 / (K·P(answer | question)) over the training questions (K answers seen for "
            "that question), so that the question-only prior no longer lowers the loss."
            if m["args"].get("balanced") == "True"
            else ""
        )
        + (
            f" Auxiliary linear probes (weight {m['args']['match_aux']}, discarded after training) read the decoder's "
            "hidden state at the colour or shape word a yes/no question names: the image's colour and shape at layer "
            f"{config.text_config.num_hidden_layers // 4}, whether the word matches the image and whether the question "
            f"is negated at layer {config.text_config.num_hidden_layers // 2}, and the answer (match XOR negated) at "
            f"layer {(3 * config.text_config.num_hidden_layers) // 4}. Without them the answer loss alone never "
            "learned yes/no past the question-only baseline."
            if float(m["args"].get("match_aux", 0))
            else ""
        )
        + " For speed the decoder sees "
        f"{m['args'].get('train_tokens', '0')} of the 256 vision tokens per image in this stage (every token the "
        "object "
        "touches plus random background tokens, at their original positions; 0 = all). The question-independent "
        "vision prefix is run once per image and its KV cache shared by the image's questions (the same function "
        "as separate prompts; checked against a plain forward of the processor's prompt).",
        f"3. Full prompts ({m['args']['prior_epochs']} epoch(s), lr {m['args']['prior_lr']}): the same losses without "
        "answer weights and with all 256 vision tokens, so the model sees prompts of the length it is used with.",
        "",
        f"Training time: vision {m['training_seconds']['vision_pretrain'] / 60:.1f} min, answers "
        f"{m['training_seconds']['full_model'] / 60:.1f} min, full prompts "
        f"{m['training_seconds']['prior_stage'] / 60:.1f} min, "
        f"evaluation {m['training_seconds']['evaluation'] / 60:.1f} min on {m['device']} (torch {m['torch']})."
        + (
            f" Stages 1-2 ran in one invocation and stage 3 in a second one (`--init-from {m['continued_from']}`), "
            "which is what the single default command does in one go."
            if m.get("continued_from")
            else ""
        )
        + (
            " The training run's own evaluation was stopped after the checkpoint was saved; the figures below come "
            "from `--init-from CHECKPOINT --evaluate-only` on that checkpoint (same code, same test canvases)."
            if m.get("re_evaluated")
            else ""
        ),
        "",
        "## Accuracy (test split, exact match, %)",
        "| evaluation | overall | shape | colour | yes/no | questions |",
        "| --- | --- | --- | --- | --- | --- |",
        row("greedy `generate()`, all vision tokens", m["test_accuracy"]),
        row("question only (majority training answer per question)", m["question_only_baseline"]),
    ]
    if m.get("test_accuracy_by_placement"):
        lines.insert(-1, row("… images placed full-frame (128 px)", m["test_accuracy_by_placement"]["full_frame"]))
        lines.insert(
            -1,
            row(
                f"… images placed small ({data.SCALE_RANGE[0]}–{data.SCALE_RANGE[1]} px)",
                m["test_accuracy_by_placement"]["placed"],
            ),
        )
    if m.get("subset_accuracy"):
        lines.append(
            row("fixed 200-question subset (`testset/prompts.jsonl`), greedy `generate()`", m["subset_accuracy"])
        )
    lines += [
        "",
        f"## Do the answers depend on the vision tokens? (first {m['dependence_check_images']} test images, first "
        "answer token, tokens removed before the decoder, %)",
        "| vision tokens given to the decoder | overall | shape | colour | yes/no | questions |",
        "| --- | --- | --- | --- | --- | --- |",
        row("all 256", c["first_token_all_tokens"]),
        row("random 50% (128)", c["random_drop_50"]),
        row("random 25% (64)", c["random_drop_75"]),
        row("all except those the object touches", c["object_tokens_removed"]),
        row("only those the object touches", c["object_tokens_only"]),
        row("none", c["no_vision_tokens"]),
        "",
        "Removing tokens: the kept tokens keep their positions (as LightKV does); a random draw per image "
        "(seed 12345).",
        "Dropping half the tokens at random costs "
        f"{100 * (c['first_token_all_tokens']['overall'] - c['random_drop_50']['overall']):.1f} "
        f"points; removing the object's tokens costs "
        f"{100 * (c['first_token_all_tokens']['overall'] - c['object_tokens_removed']['overall']):.1f} points.",
        "",
        "## Limits",
        f"- Shape questions: {100 * m['test_accuracy']['shape']:.1f}% against "
        f"{100 * m['question_only_baseline']['shape']:.1f}% "
        f"from the question alone; yes/no: {100 * m['test_accuracy']['yes/no']:.1f}% against "
        f"{100 * m['question_only_baseline']['yes/no']:.1f}%. Where these are close, the model has not learned to read "
        "that attribute from the image in this training budget; colour is read from the object's tokens.",
        f"- Removing every token the object touches leaves shape at "
        f"{100 * c['object_tokens_removed']['shape']:.1f}% (all tokens: "
        f"{100 * c['first_token_all_tokens']['shape']:.1f}%) and "
        f"colour at {100 * c['object_tokens_removed']['colour']:.1f}% (all tokens: "
        f"{100 * c['first_token_all_tokens']['colour']:.1f}%): "
        "where the first figure stays high, the vision encoder's attention spread that attribute beyond the object's "
        "own tokens, and no token reduction can hurt it much.",
        "- Rebuilds follow the same data order, initialisation and placements from the seed; CPU kernels "
        "(index backward, attention) are not bit-deterministic, so a rebuild's figures can differ slightly.",
        "",
        "`metrics.json` holds the same figures, machine-readable (the tests read `subset_accuracy` from it).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
