"""LiRA offline with two queries per example: the benign input and the PGD input."""

from robmia_db.attacks.calibrated import lira_attack

ATTACK = {
    "title": "LiRA offline, benign + PGD queries (one-sided z-scores averaged)",
    "paper": "Carlini et al. IEEE S&P 2022 (multi-query LiRA), https://arxiv.org/abs/2112.03570; queries after Song, Shokri, Mittal CCS 2019",
    "needs": ["benign", "adversarial", "reference_models"],
    "params": {"location": "median", "variance": "global"},
    "decision_threshold": 2.3263478740408408,
    "description": (
        "lira_offline's one-sided z on the benign and on the adversarial signals, each against its own OUT "
        "Gaussian, averaged (so one query's rule, z >= 2.326, carries over). Scored once per adversarial "
        "perturbation."
    ),
}


def score(ctx, params):
    return lira_attack(ctx, params, "lira_offline_joint", "offline", ("benign", "adversarial"))
