"""Class-dependent thresholds (Song & Mittal 2021), calibrated on reference models."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

ATTACK = {
    "title": "Class-dependent thresholds (calibrated on reference models)",
    "paper": "Song, Mittal. Systematic Evaluation of Privacy Risks of Machine Learning Models. USENIX Security 2021. https://arxiv.org/abs/2003.10595",
    "needs": ["signal", "reference_models"],
    "params": {"signal": "confidence"},
    "description": (
        "For each class, the threshold on the chosen signal (confidence, loss, entropy, mentropy or margin; "
        "oriented so that higher = member) that best separates members of the reference models; the score is "
        "the signal minus its class's threshold, so 0 is the calibrated decision boundary."
    ),
}

# orientation: each signal column, signed so that higher means "more likely a member"
SIGNALS = {
    "confidence": "CAST(confidence AS DOUBLE)",
    "loss": "-loss",
    "entropy": "-entropy",
    "mentropy": "-mentropy",
    "margin": "margin",
}


def score(ctx, params):
    from robmia_db.attacks.metrics import reference_metrics
    from robmia_db.errors import AttackDefinitionError

    signal = params["signal"]
    if signal not in SIGNALS:
        raise AttackDefinitionError(
            None, f"class_thresholds: param signal must be one of {sorted(SIGNALS)} (got {signal!r})"
        )
    expression = SIGNALS[signal]
    target = ctx.sql(f"SELECT model_key, example_id, label, {expression} AS value FROM target").to_pandas()
    reference = ctx.sql(
        f"SELECT target_model_key, label, is_member, {expression} AS value FROM reference"
    ).to_pandas()
    pieces = []
    for model_key, rows in target.groupby("model_key", sort=False):
        refs = reference[reference["target_model_key"] == model_key]
        overall = reference_metrics(refs["value"].to_numpy(float), refs["is_member"].to_numpy(bool))[
            "threshold"
        ]
        overall = float(overall) if overall is not None else float(refs["value"].max())
        thresholds = {}
        for label, group in refs.groupby("label"):
            found = reference_metrics(group["value"].to_numpy(float), group["is_member"].to_numpy(bool))[
                "threshold"
            ]
            thresholds[int(label)] = float(found) if found is not None else overall
        shift = np.array([thresholds.get(int(c), overall) for c in rows["label"].to_numpy()], dtype=float)
        pieces.append(
            pa.table(
                {
                    "model_key": rows["model_key"].to_numpy(),
                    "example_id": rows["example_id"].to_numpy(),
                    "score": rows["value"].to_numpy(float) - shift,
                }
            )
        )
    return pa.concat_tables(pieces)
