"""Independent numpy restatements of the reference-model attacks, for tests and the benchmark.

Written from the definitions in shared/docs/reference-attacks.md (TF Privacy's `compute_score_lira`
conventions, the RMIA paper's Score(x), Song & Mittal's histograms and `_thre_setting`), on dense
[model, example] arrays for a whole fleet, with masked arrays and scipy rather than the package's code
paths (no NaN-pivot, no sorted-CDF trick). Every function scores one target `t` with the fleet minus t.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm


def phi_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log p_y - log(1 - p_y) = l_y - logsumexp over the other classes, float64 via scipy."""
    z = np.asarray(logits, dtype=np.float32).astype(np.float64)
    rows = np.arange(len(labels))
    mask = np.zeros_like(z, dtype=bool)
    mask[rows, labels] = True
    return z[rows, labels] - logsumexp(np.where(mask, -np.inf, z), axis=1)


def log_p_true(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float32).astype(np.float64)
    return z[np.arange(len(labels)), labels] - logsumexp(z, axis=1)


def _masked(values: np.ndarray, keep: np.ndarray) -> np.ma.MaskedArray:
    return np.ma.masked_array(values, mask=~keep)


def _fill(per_example: np.ma.MaskedArray) -> np.ndarray:
    """Column-mean fill of examples with no observation (TF Privacy)."""
    filled = per_example.filled(np.nan).astype(np.float64)
    if np.isnan(filled).any():
        filled[np.isnan(filled)] = per_example.mean()
    return filled


def fit(values: np.ndarray, keep: np.ndarray, location: str, variance: str) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian per example over the kept reference entries of values[m, n]."""
    masked = _masked(values, keep)
    loc = np.ma.median(masked, axis=0) if location == "median" else masked.mean(axis=0)
    if variance == "global":
        deviations = masked - _fill(loc)[None, :]
        scale = np.full(values.shape[1], deviations.compressed().std())
    else:
        scale = _fill(masked.std(axis=0))
    return _fill(loc), scale + 1e-30


def lira(
    phi: np.ndarray,
    members: np.ndarray,
    t: int,
    mode: str,
    location: str = "median",
    variance: str = "global",
) -> np.ndarray:
    """One query: online LLR (member-high) or offline one-sided z for target t; phi and members are [M, N]."""
    others = np.arange(len(phi)) != t
    values, inside = phi[others], members[others]
    mu_out, s_out = fit(values, ~inside, location, variance)
    if mode == "offline":
        return (phi[t] - mu_out) / s_out
    mu_in, s_in = fit(values, inside, location, variance)
    return norm.logpdf(phi[t], mu_in, s_in) - norm.logpdf(phi[t], mu_out, s_out)


def rmia(
    p_true: np.ndarray, members: np.ndarray, t: int, mode: str, gamma: float, a: float = 1.0
) -> np.ndarray:
    """Score(x) = share of z in the target's other examples with r(x)/r(z) >= gamma, by the full |X| x |Z|
    comparison; p_true[M, N] are true-label probabilities."""
    others = np.arange(len(p_true)) != t
    values, inside = p_true[others], members[others]
    p_out = _fill(_masked(values, ~inside).mean(axis=0))
    if mode == "online":
        pr = 0.5 * _fill(_masked(values, inside).mean(axis=0)) + 0.5 * p_out
    else:
        pr = (1 + a) / 2 * p_out + (1 - a) / 2
    ratio = p_true[t] / pr
    dominated = ratio[:, None] / ratio[None, :] >= gamma
    np.fill_diagonal(dominated, False)
    return dominated.sum(axis=1) / (len(ratio) - 1)


def thre_setting(train: np.ndarray, test: np.ndarray) -> float:
    """Song & Mittal's `_thre_setting`, as a literal loop."""
    thre, max_acc = 0.0, 0.0
    for value in np.concatenate((train, test)):
        acc = 0.5 * (np.sum(train >= value) / (len(train) + 0.0) + np.sum(test < value) / (len(test) + 0.0))
        if acc > max_acc:
            thre, max_acc = float(value), acc
    return thre


def risk_posterior(
    train: np.ndarray, test: np.ndarray, values: np.ndarray, num_bins: int = 5, log_bins: bool = True
) -> np.ndarray:
    """Song & Mittal's per-class histogram posterior, restated with a loop per looked-up value."""
    if log_bins:
        train, test = np.maximum(train, 1e-10), np.maximum(test, 1e-10)
    low, high = min(train.min(), test.min()), max(train.max(), test.max())
    if low == high:
        return np.full(len(values), 0.5)
    edges = (
        np.logspace(np.log10(low), np.log10(high), num_bins + 1)
        if log_bins
        else np.linspace(low, high, num_bins + 1)
    )
    h_tr = np.histogram(train, bins=edges)[0] / len(train)
    h_te = np.histogram(test, bins=edges)[0] / len(test)
    out = []
    for v in values:
        if v >= edges[-1]:
            b = num_bins - 1
        elif v <= edges[0]:
            b = 0
        else:
            b = int(np.max(np.nonzero(edges <= v)[0]))
        distance = 0
        while h_tr[b] + h_te[b] == 0 and distance < num_bins:
            distance += 1
            if b - distance >= 0 and h_tr[b - distance] + h_te[b - distance] > 0:
                b = b - distance
            elif b + distance < num_bins and h_tr[b + distance] + h_te[b + distance] > 0:
                b = b + distance
        out.append(h_tr[b] / (h_tr[b] + h_te[b]))
    return np.array(out)
