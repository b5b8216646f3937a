"""Store layer: per-sample signal columns from float32 logits or probabilities (numpy only).

Fidelity: probabilities are the float32 softmax of float32 logits with max-subtraction, exactly as the
paper's `softmax_by_row` computed them, so true-label confidences saturate at 1.0f and tie as in the
paper. Loss, margin, entropy and modified entropy are computed in float64 from the log-softmax, which
keeps them finite and informative where the float32 confidence has saturated.

`confidence_logit` is LiRA's statistic phi = log p_y - log(1 - p_y) (Carlini et al. 2022). From logits it
is computed exactly as l_y - logsumexp_{j != y} l_j in float64, which needs no epsilon and never saturates
(the float32 p_y of 1.0 would give +inf). From probabilities (imported outputs, where the logits are
unknown) it follows the reference code (Carlini's `score.py`, TF Privacy's `calculate_statistic`):
log(p_y + 1e-45) - log(sum_{j != y} p_j + 1e-45) in float64, summing the other classes rather than taking
1 - p_y, so it stays informative until the other classes underflow float32 (|phi| near 103.6).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_LOG_FLOOR = np.log(np.finfo(np.float64).tiny)
_REFERENCE_EPS = 1e-45  # the reference code's epsilon for phi from probabilities


def confidence_logit_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = l_y - logsumexp_{j != y} l_j in float64: exact, no epsilon, no saturation."""
    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(z))
    others = z.copy()
    others[rows, labels] = -np.inf
    top = others.max(axis=1)
    with np.errstate(invalid="ignore"):
        log_others = top + np.log(np.exp(others - top[:, None]).sum(axis=1))
    return z[rows, labels] - log_others


def confidence_logit_from_probs(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi from probabilities as the reference code computes it (float64, the other classes summed)."""
    p = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(p))
    true = p[rows, labels]
    others = p.sum(axis=1, where=np.arange(p.shape[1])[None, :] != labels[:, None])
    return np.log(true + _REFERENCE_EPS) - np.log(others + _REFERENCE_EPS)


def softmax_float32(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The paper's softmax: float32 throughout, max subtracted per row."""
    z = np.asarray(logits, dtype=np.float32)
    if temperature != 1.0:
        z = z / np.float32(temperature)
    shifted = z - z.max(axis=1, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    return (exp / exp.sum(axis=1, keepdims=True, dtype=np.float32)).astype(np.float32)


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    top = z.argmax(axis=1)
    shifted = z - z[np.arange(len(z)), top][:, None]
    others = np.exp(shifted)
    others[np.arange(len(z)), top] = 0.0
    # log(1 + sum of the others) via log1p keeps tiny losses exact where 1 + sum would round to 1
    return shifted - np.log1p(others.sum(axis=1, keepdims=True))


def _columns_from_log_probs(
    log_probs: np.ndarray, probs32: np.ndarray, labels: np.ndarray, is_correct: np.ndarray | None
) -> dict[str, np.ndarray]:
    n = len(labels)
    rows = np.arange(n)
    log_probs = np.maximum(log_probs, _LOG_FLOOR)
    true_log = log_probs[rows, labels]
    others = log_probs.copy()
    others[rows, labels] = -np.inf
    best_other_log = others.max(axis=1) if log_probs.shape[1] > 1 else np.full(n, -np.inf)
    probs64 = np.exp(log_probs)
    entropy = -(probs64 * log_probs).sum(axis=1)
    # Song & Mittal 2021: Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
    log_one_minus = np.log(np.maximum(-np.expm1(log_probs), np.finfo(np.float64).tiny))
    other_terms = probs64 * log_one_minus
    other_terms[rows, labels] = 0.0
    one_minus_true = -np.expm1(true_log)  # 1 - p_y without cancellation when p_y is near 1
    mentropy = -one_minus_true * true_log - other_terms.sum(axis=1)
    if is_correct is None:
        is_correct = np.argmax(log_probs, axis=1) == labels
    return {
        "loss": -true_log,
        "confidence": probs32[rows, labels].astype(np.float32),
        "margin": true_log - best_other_log,
        "entropy": entropy,
        "mentropy": mentropy,
        "is_correct": np.asarray(is_correct, dtype=bool),
        "probs": probs32,
    }


def signals_from_logits(
    logits: np.ndarray, labels: np.ndarray, is_correct: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Signal columns from float32 logits; `margin` is the logit margin z_y - max_{j != y} z_j."""
    logits32 = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    columns = _columns_from_log_probs(_log_softmax64(logits32), softmax_float32(logits32), labels, is_correct)
    columns["confidence_logit"] = confidence_logit_from_logits(logits32, labels)
    return columns


def signals_from_probs(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Signal columns from stored float32 probabilities (imported outputs): margin = log p_y - log max p_j."""
    probs32 = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    with np.errstate(divide="ignore"):
        log_probs = np.log(probs32.astype(np.float64))
    columns = _columns_from_log_probs(log_probs, probs32, labels, None)
    columns["confidence_logit"] = confidence_logit_from_probs(probs32, labels)
    return columns


def probs_array(probs: np.ndarray) -> pa.ListArray:
    """A (N, C) float32 matrix as an Arrow list column without a Python loop."""
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    n, c = probs.shape
    offsets = pa.array(np.arange(0, (n + 1) * c, c, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1)))


def signal_table(
    signal_key: str,
    model_key: str,
    example_ids: np.ndarray,
    labels: np.ndarray,
    is_member: np.ndarray,
    columns: dict[str, np.ndarray],
) -> pa.Table:
    """The Arrow table of one perturbation's rows, in the `signals` table's column order."""
    n = len(example_ids)
    return pa.table(
        {
            "signal_key": pa.repeat(pa.scalar(signal_key, pa.string()), n),
            "model_key": pa.repeat(pa.scalar(model_key, pa.string()), n),
            "example_id": pa.array(np.asarray(example_ids, dtype=np.int32)),
            "label": pa.array(np.asarray(labels, dtype=np.int32)),
            "is_member": pa.array(np.asarray(is_member, dtype=bool)),
            "loss": pa.array(np.asarray(columns["loss"], dtype=np.float64)),
            "confidence": pa.array(np.asarray(columns["confidence"], dtype=np.float32)),
            "margin": pa.array(np.asarray(columns["margin"], dtype=np.float64)),
            "entropy": pa.array(np.asarray(columns["entropy"], dtype=np.float64)),
            "mentropy": pa.array(np.asarray(columns["mentropy"], dtype=np.float64)),
            "is_correct": pa.array(np.asarray(columns["is_correct"], dtype=bool)),
            "probs": probs_array(columns["probs"]),
            "confidence_logit": pa.array(np.asarray(columns["confidence_logit"], dtype=np.float64)),
        }
    )
