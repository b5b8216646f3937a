"""Privacy risk score (Song & Mittal 2021): Bayes posterior of membership from per-class histograms."""

from robmia_db.attacks.calibrated import risk_score_attack

ATTACK = {
    "title": "Privacy risk score (posterior membership probability from reference histograms)",
    "paper": "Song, Mittal. Systematic Evaluation of Privacy Risks of Machine Learning Models. USENIX Security 2021. https://arxiv.org/abs/2003.10595",
    "needs": ["signal", "reference_models"],
    "params": {"signal": "mentropy", "num_bins": 5, "log_bins": True},
    "decision_threshold": 0.5,
    "description": (
        "Per class, histograms (num_bins log-spaced bins between the class's pooled min and max, values "
        "floored to 1e-10) of the signal (modified entropy by default; entropy or loss) on the reference "
        "models' members and non-members, each normalised; score = h_member[b] / (h_member[b] + "
        "h_nonmember[b]) for the target's bin b (an empty bin takes the nearest non-empty one, lower first), "
        "the posterior with equal priors. Member iff score >= 0.5."
    ),
}


def score(ctx, params):
    return risk_score_attack(ctx, params, "risk_score")
