"""Accuracy statistics: confidence intervals, pass@k, accuracy by response length."""
from __future__ import annotations

import math
from typing import Sequence

# --- statistics -----------------------------------------------------------------------------

def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of an accuracy: unlike p +- z*se it stays inside [0, 1] and is not
    zero-width at 0% or 100%, which small eval sets hit often. n=0 says nothing: (0, 1)."""
    if n < 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), as the
    product 1 - prod_{i=n-c+1}^{n} (1 - k/i) so large n neither overflows nor cancels."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def length_buckets(lengths: Sequence[int], correct: Sequence[bool],
                   edges: Sequence[int] = (32, 64, 128, 256, 512, 1024)) -> list[dict]:
    """Accuracy by response length, to see whether errors come from long (rambling or truncated)
    answers. Buckets are [0, e0), [e0, e1), ..., [e_last, inf), labelled "0-31" ... ">=1024";
    empty ones are left out."""
    if len(lengths) != len(correct):
        raise ValueError(f"lengths and correct differ in length: {len(lengths)} vs {len(correct)}")
    edges = list(edges)
    if not edges or edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be positive and strictly increasing, got {edges}")
    if any(x < 0 for x in lengths):
        raise ValueError("lengths must be >= 0")
    bounds = [0, *edges]
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(bounds, edges)] + [f">={edges[-1]}"]
    tallies = [[0, 0] for _ in labels]
    for length, ok in zip(lengths, correct):
        i = sum(length >= e for e in edges)
        tallies[i][0] += 1
        tallies[i][1] += bool(ok)
    return [{"bucket": label, "n": n, "accuracy": hits / n}
            for label, (n, hits) in zip(labels, tallies) if n]


