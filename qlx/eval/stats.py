"""Means with 95% bootstrap intervals over items (and over an item's samples when it has several), optionally as a
macro-average of strata (LongBench v1 QA: the mean of the five subset means)."""

import numpy as np

N_BOOT = 2000


def _matrix(groups):
    k = np.array([len(g) for g in groups])
    if (k < 1).any():
        raise ValueError("every item needs at least one score")
    m = np.full((len(groups), k.max()), np.nan)
    for i, g in enumerate(groups):
        m[i, : len(g)] = g
    return m, k


def _stratum_draws(m, k, rng, n_boot):
    n = len(k)
    items = rng.integers(0, n, size=(n_boot, n))
    if k.max() == 1:
        return m[items, 0].mean(axis=1)
    samples = np.floor(rng.random((n_boot, n)) * k[items]).astype(int)
    return m[items, samples].mean(axis=1)


def bootstrap_mean(groups, strata=None, *, n_boot=N_BOOT, seed=0, level=0.95):
    """(mean, low, high) of the column statistic over ``groups`` (one sequence of sample scores per item).

    statistic: the mean over items of each item's mean score, or with ``strata`` (one label per item) the mean over
    strata of those means. Interval: percentile bootstrap with ``n_boot`` resamples, items drawn with replacement
    within each stratum and, for an item with k > 1 samples, one of its samples drawn per pick.
    """
    if len(groups) == 0:
        return float("nan"), float("nan"), float("nan")
    labels = np.zeros(len(groups), int) if strata is None else np.unique(np.asarray(strata), return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    points, draws = [], []
    for s in range(labels.max() + 1):
        m, k = _matrix([g for g, label in zip(groups, labels, strict=True) if label == s])
        points.append(float(np.mean(np.nansum(m, axis=1) / k)))
        draws.append(_stratum_draws(m, k, rng, n_boot))
    boot = np.mean(draws, axis=0)
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return float(np.mean(points)), float(low), float(high)
