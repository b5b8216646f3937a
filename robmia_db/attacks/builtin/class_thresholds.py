"""Class-dependent thresholds (Song & Mittal 2021), set on reference models and applied directly."""

from robmia_db.attacks.calibrated import class_thresholds_attack

ATTACK = {
    "title": "Class-dependent thresholds (Song & Mittal's rule, thresholds set on reference models)",
    "paper": "Song, Mittal. Systematic Evaluation of Privacy Risks of Machine Learning Models. USENIX Security 2021. https://arxiv.org/abs/2003.10595",
    "needs": ["signal", "reference_models"],
    "params": {"signal": "confidence"},
    "decision_threshold": 0.0,
    "description": (
        "Per class y, tau_y by Song & Mittal's _thre_setting on the reference models' members (train) and "
        "non-members (test) of that class: the first candidate value (train values, then test values) that "
        "maximises 1/2 (frac(train >= v) + frac(test < v)), tau_y = 0 where the class lacks either. "
        "score = feature - tau_y, member iff score >= 0 (their decision rule). Features oriented member-high: "
        "confidence, -entropy, -mentropy (theirs), -loss, margin."
    ),
}


def score(ctx, params):
    return class_thresholds_attack(ctx, params, "class_thresholds")
