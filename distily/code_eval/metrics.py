"""pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code").

With ``n`` samples of a problem of which ``c`` pass, the probability that at least one of ``k`` samples drawn
without replacement passes is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

The product form avoids the huge binomials (C(200, 100) ~ 9e58) and is exact to rounding; it is 1 when fewer
than ``k`` samples fail (``n - c < k``). The score of a task set is the mean over its problems.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError

DEFAULT_KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of ``k`` of the ``n`` samples (``c`` of them correct) passes."""
    if not 0 <= c <= n:
        raise ConfigError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ConfigError(f"pass@{k} needs 1 <= k <= n, the number of samples per task (n={n}); lower k.")
    if n - c < k:
        return 1.0
    fail_all = 1.0
    for i in range(n - c + 1, n + 1):
        fail_all *= 1.0 - k / i
    return 1.0 - fail_all


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """The mean of :func:`pass_at_k` over problems given as ``(n, c)`` pairs."""
    if not counts:
        raise ConfigError("pass@k of no problems is undefined.")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def default_ks(counts: Sequence[tuple[int, int]]) -> list[int]:
    """The k of :data:`DEFAULT_KS` that every problem has enough samples for (pass@1 always)."""
    fewest = min(n for n, _ in counts)
    return [k for k in DEFAULT_KS if k <= fewest]
