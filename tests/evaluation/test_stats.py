"""Statistics of an evaluation: Wilson intervals, pass@k, accuracy by response length."""
import itertools
import math

import pytest

from mmdistill.evaluation.stats import length_buckets, pass_at_k, wilson_interval


def test_wilson_interval():
    # 8/10 at z=1.96 by hand: centre (0.8 + 3.8416/20) / 1.38416 = 0.716738,
    # half 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.226584
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.490155, abs=1e-5) and hi == pytest.approx(0.943322, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0 < hi < 0.2
    lo, hi = wilson_interval(20, 20)
    assert 0.8 < lo < 1 and hi == 1.0
    assert wilson_interval(50, 100, z=0)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        wilson_interval(5, 4)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations(range(n), k))
                brute = sum(any(i < c for i in d) for d in draws) / len(draws)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert pass_at_k(10_000, 1, 1) == pytest.approx(1e-4)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


def test_length_buckets():
    rows = length_buckets([0, 31, 32, 100, 2000, 1024], [1, 0, 1, True, False, 1])
    assert rows == [
        {"bucket": "0-31", "n": 2, "accuracy": 0.5},
        {"bucket": "32-63", "n": 1, "accuracy": 1.0},
        {"bucket": "64-127", "n": 1, "accuracy": 1.0},
        {"bucket": ">=1024", "n": 2, "accuracy": 0.5},
    ]
    assert length_buckets([9, 10], [0, 1], edges=(10,)) == [
        {"bucket": "0-9", "n": 1, "accuracy": 0.0}, {"bucket": ">=10", "n": 1, "accuracy": 1.0}]
    assert length_buckets([], []) == []
    with pytest.raises(ValueError, match="differ in length"):
        length_buckets([1, 2], [True])
    with pytest.raises(ValueError, match="strictly increasing"):
        length_buckets([1], [True], edges=(64, 32))
