"""Statistics for accuracies: Wilson score intervals, scores over several draws of a random
defense, and paired comparisons of two cells on the same samples (exact McNemar test and
Newcombe's interval for the difference)."""

from __future__ import annotations

import math


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a binomial proportion."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def draw_scores(counts: list[int], draws: int, majority: list[bool], single: list[bool]) -> dict:
    """The accuracies of a cell scored under ``draws`` draws of the defense's randomness, each with
    n_correct, accuracy and Wilson 95% interval: ``all`` (correct under every draw: robust against
    resubmission), ``mean`` (the mean over draws: the expected single-draw accuracy; its interval
    treats the mean as a proportion of n, which is conservative because a per-sample mean in [0,1]
    varies less than a 0/1 outcome), ``majority`` (the plurality vote of the draws is the true
    label) and ``single`` (the first draw alone)."""
    n = len(counts)
    ks = {"all": sum(1 for c in counts if c == draws), "mean": sum(counts) / draws,
          "majority": sum(map(bool, majority)), "single": sum(map(bool, single))}
    return {name: {"n_correct": k, "accuracy": k / n if n else float("nan"), "ci95": list(wilson_interval(k, n))}
            for name, k in ks.items()}


def mcnemar(a: str, b: str) -> dict:
    """Paired comparison of two '0'/'1' strings over the same samples: the exact (binomial) McNemar
    test on the discordant pairs, two-sided, and the difference a - b in accuracy with Newcombe's
    (1998, method 10) 95% interval for paired proportions."""
    if len(a) != len(b) or not a:
        raise ValueError("a paired comparison needs two non-empty results over the same samples")
    from scipy.stats import binomtest

    n = len(a)
    both = sum(1 for u, v in zip(a, b) if u == "1" and v == "1")
    only_a = sum(1 for u, v in zip(a, b) if u == "1" and v == "0")
    only_b = sum(1 for u, v in zip(a, b) if u == "0" and v == "1")
    neither = n - both - only_a - only_b
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n)
    l2, u2 = wilson_interval(both + only_b, n)
    denom = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(denom) if denom > 0 else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"n": n, "only_a": only_a, "only_b": only_b, "difference": d, "ci95": [max(-1.0, lo), min(1.0, hi)],
            "p_value": p}


def paired_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of a paired comparison of per-sample scores in [0,1] over the same samples:
    the exact McNemar test when both are 0/1 (correct or not), else the Wilcoxon signed-rank test on
    the per-sample differences (a mean over scoring draws per sample), zero differences dropped."""
    if len(a) != len(b) or not a:
        raise ValueError("a paired comparison needs two non-empty results over the same samples")
    if all(v in (0, 1) for v in a) and all(v in (0, 1) for v in b):
        return mcnemar("".join(str(int(v)) for v in a), "".join(str(int(v)) for v in b))["p_value"]
    diffs = [u - v for u, v in zip(a, b) if u != v]
    if not diffs:
        return 1.0
    from scipy.stats import wilcoxon

    return float(wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)
