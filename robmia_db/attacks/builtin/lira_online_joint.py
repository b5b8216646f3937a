"""LiRA online with two queries per example: the benign input and the PGD input, each its own Gaussian."""

from robmia_db.attacks.calibrated import lira_attack

ATTACK = {
    "title": "LiRA online, benign + PGD queries (per-query LLRs summed)",
    "paper": "Carlini et al. IEEE S&P 2022 (multi-query LiRA), https://arxiv.org/abs/2112.03570; queries after Song, Shokri, Mittal CCS 2019",
    "needs": ["benign", "adversarial", "reference_models"],
    "params": {"location": "median", "variance": "global"},
    "decision_threshold": 0.0,
    "description": (
        "lira_online on the benign and on the adversarial (PGD) signals, each with its own IN and OUT "
        "Gaussians, log-likelihood ratios summed (Carlini's code averages them: the same ranking, and the "
        "same sign for the LLR >= 0 rule). Scored once per adversarial perturbation."
    ),
}


def score(ctx, params):
    return lira_attack(ctx, params, "lira_online_joint", "online", ("benign", "adversarial"))
