"""The paired test of ``lightkv check --max-drop``: a run against the uncompressed run on the same inputs.

A threshold asks "is this run good enough"; the paired test asks "did compression make it worse than
the full cache, by more than a margin, beyond what chance explains on these inputs". Each input is
scored in both runs, so the comparison is paired, and the gate fails only when the drop is
*significantly* larger than the margin: the one-sided 95% lower confidence bound of the drop exceeds
it (equivalently, the one-sided p-value of ``H0: drop ≤ margin`` is below 0.05).

Which test, per metric (values from ``runs[].per_input[].quality``, inputs matched by ``input`` id):

* **Answer match and top-1 agreement** compare the run with the uncompressed run itself, so for the
  reference they are 1 on every input by definition: the paired difference is just the share of inputs
  whose answer (first token) changed, ``m`` of ``n``. A McNemar test would see ``c = 0`` discordant
  pairs in the run's favour by construction; the right test is the **exact one-sample binomial test**
  of ``H0: P(changed) ≤ margin``: ``p = P(X ≥ m | n, margin)``, with the exact (Clopper-Pearson)
  one-sided lower bound of the changed share, its inversion.
* **Accuracy** (against the prompts file's answers, inputs with an answer) is 0/1 in both runs and
  either may be right where the other is wrong: ``b`` inputs right uncompressed and wrong compressed,
  ``c`` the reverse. The table carries the **exact McNemar** p-value of "no difference" (two-sided
  binomial on the ``b + c`` discordant pairs); the gate uses **Tango's score test** of ``H0: Δ ≤
  margin`` for the paired difference ``Δ = (b − c)/n`` and its inverted one-sided lower bound
  (Tango 1998; recommended for paired proportions by Fagerland, Lydersen & Laake 2014). McNemar's exact
  test has no form for a non-zero margin (under ``Δ = margin`` the split of the discordant pairs
  depends on their unknown total); Tango's statistic reduces to McNemar's at ``margin = 0``.
* **First-token KL and continuation KL** (nats) are continuous: a **paired bootstrap** (fixed seed) of
  the per-input increase over the reference; reported, not gated (the margin is a share of inputs, not
  nats: bound KL with ``--max-kl``).
* **Token agreement** (the continuation's top-1 agreement, a fraction of each input's positions; the
  reference's is 1 by definition) uses the paired bootstrap of the drop, gated by the margin. A first-token
  metric that is n/a for the run (post-prefill eviction) has no per-input values and is left out.

Per-input values that are not all 0/1 (a metric averaged over generated tokens) use the paired
bootstrap of the drop instead of the exact tests. No torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lightkv_cli.scoring.stats import (
    binomial_upper_tail,
    bootstrap_ci,
    clopper_pearson_lower,
    is_binary,
    mcnemar_exact,
    paired_bootstrap_ci,
    paired_difference_test,
)

#: Confidence level of the paired test (one-sided).
PAIRED_LEVEL = 0.95


#: (per-input key, label, compared with the reference itself, gated by the margin), in table order.
PAIRED_METRICS = (
    ("exact_match", "answer match", True, True),
    ("top1_agreement", "top-1 agreement", True, True),
    ("accuracy", "accuracy", False, True),
    ("first_token_kl", "first-token KL (nats)", False, False),
    ("token_agreement", "token agreement", True, True),
    ("continuation_kl", "continuation KL (nats)", False, False),
)

#: Per-input KL keys (nats): compared by a paired bootstrap of the increase, reported, not gated.
_KL_KEYS = ("first_token_kl", "continuation_kl")


@dataclass
class PairedResult:
    """One metric of a run compared with the uncompressed run on the same inputs.

    Attributes:
        metric: the per-input key (``exact_match``, ``top1_agreement``, ``accuracy``, ``first_token_kl``,
            ``token_agreement``, ``continuation_kl``).
        label: its name in the check table.
        test: the method: ``exact binomial``, ``Tango score``, ``paired bootstrap``.
        n: inputs compared (both runs have a value).
        reference: the uncompressed run's mean over those inputs (1 for answer match / top-1 agreement).
        value: the run's mean over those inputs.
        drop: ``reference − value`` (for KL the increase ``value − reference``, nats).
        lower: one-sided 95% lower confidence bound of ``drop``.
        p_value: one-sided p-value of ``H0: drop ≤ margin`` (``None`` for the bootstrap and for KL).
        mcnemar_p: exact two-sided McNemar p-value of "no difference" (accuracy on 0/1 values), else ``None``.
        discordant: ``(b, c)`` for accuracy: inputs right only uncompressed, right only compressed; for
            answer match / top-1: ``(changed, 0)``; ``None`` for the bootstrap.
        margin: the largest acceptable drop (``--max-drop``), a fraction of inputs.
        gated: whether the margin applies (False for KL: reported only).
        passed: False when gated and the drop is significantly larger than ``margin``.
    """

    metric: str
    label: str
    test: str
    n: int
    reference: float
    value: float
    drop: float
    lower: float
    p_value: float | None
    mcnemar_p: float | None
    discordant: tuple[int, int] | None
    margin: float
    gated: bool
    passed: bool

    def describe(self) -> str:
        """e.g. ``accuracy drop 0.250 (95% lower bound 0.061 > 0.02; p = 0.012, Tango score; McNemar p = 0.125)``."""
        unit = " nats" if self.metric in _KL_KEYS else ""
        what = "increase" if self.metric in _KL_KEYS else "drop"
        text = f"{self.label} {what} {self.drop:.3f}{unit} (95% lower bound {self.lower:.3f}"
        if self.gated:
            text += f" {'≤' if self.passed else '>'} {self.margin:g}"
        if self.p_value is not None:
            text += f"; p = {self.p_value:.3g}"
        text += f", {self.test}"
        if self.mcnemar_p is not None:
            text += f"; McNemar p = {self.mcnemar_p:.3g}"
        return text + f"; {self.n} inputs)"

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready but for non-finite floats)."""
        d = asdict(self)
        d["discordant"] = list(self.discordant) if self.discordant is not None else None
        return d


def _values(run: dict, key: str) -> dict:
    """input id → the per-input value of ``key`` (entries without a number left out)."""
    out = {}
    for i, entry in enumerate(run.get("per_input") or []):
        if not isinstance(entry, dict):
            continue
        q = entry.get("quality")
        v = q.get(key) if isinstance(q, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
            out[entry.get("input", i)] = float(v)
    return out


def _bootstrap_lower(drops: list[float], level: float) -> float:
    """One-sided ``level`` lower bound of the mean drop: the lower end of the two-sided ``2·level − 1`` interval."""
    return bootstrap_ci(drops, level=2.0 * level - 1.0)[0]


def paired_tests(run: dict, reference: dict, margin: float, level: float = PAIRED_LEVEL) -> list[PairedResult]:
    """Compare ``run`` with the uncompressed ``reference`` run, input by input (module docstring).

    Args:
        run: a finished run of a results file (``per_input[].quality`` with per-input values).
        reference: the uncompressed run of the same results file.
        margin: the largest acceptable drop, a fraction of inputs in [0, 1).
        level: one-sided confidence level in (0, 1).

    Returns:
        One :class:`PairedResult` per metric that both runs have on at least one common input, in the
        order of :data:`PAIRED_METRICS`.

    Raises:
        ValueError: ``margin`` outside [0, 1) or ``level`` outside (0, 1).
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    entries = enumerate(reference.get("per_input") or [])
    ref_ids = {entry.get("input", i) for i, entry in entries if isinstance(entry, dict)}
    alpha = 1.0 - level
    out = []
    for key, label, vs_reference, gated in PAIRED_METRICS:
        mine = _values(run, key)
        if vs_reference:
            ids = [i for i in mine if i in ref_ids]
            ref_vals = [1.0] * len(ids)  # the reference against itself: 1 by definition
        else:
            theirs = _values(reference, key)
            ids = [i for i in mine if i in theirs]
            ref_vals = [theirs[i] for i in ids]
        if not ids:
            continue
        vals = [mine[i] for i in ids]
        n = len(ids)
        ref_mean, mean = sum(ref_vals) / n, sum(vals) / n
        p_value = mcnemar_p = discordant = None
        if key in _KL_KEYS:
            test = "paired bootstrap"
            lower = paired_bootstrap_ci(ref_vals, vals, level=2.0 * level - 1.0)[0]
            drop = mean - ref_mean
            passed = True
        elif is_binary(vals) and is_binary(ref_vals):
            drop = ref_mean - mean
            if vs_reference:
                test = "exact binomial"
                changed = sum(1 for v in vals if v == 0.0)
                p_value = binomial_upper_tail(changed, n, margin)
                lower = clopper_pearson_lower(changed, n, level)
                discordant = (changed, 0)
            else:
                test = "Tango score"
                b = sum(1 for x, y in zip(ref_vals, vals) if x == 1.0 and y == 0.0)
                c = sum(1 for x, y in zip(ref_vals, vals) if x == 0.0 and y == 1.0)
                p_value, lower = paired_difference_test(b, c, n, margin, level)
                mcnemar_p = mcnemar_exact(b, c)
                discordant = (b, c)
            passed = p_value >= alpha
        else:
            test = "paired bootstrap"
            drops = [x - y for x, y in zip(ref_vals, vals)]
            drop = sum(drops) / n
            lower = _bootstrap_lower(drops, level)
            passed = not lower > margin
        out.append(
            PairedResult(
                metric=key,
                label=label,
                test=test,
                n=n,
                reference=ref_mean,
                value=mean,
                drop=drop,
                lower=lower,
                p_value=p_value,
                mcnemar_p=mcnemar_p,
                discordant=discordant,
                margin=margin,
                gated=gated,
                passed=passed or not gated,
            )
        )
    return out
