"""LiRA online with three queries per example: benign, PGD and verified worst-case outputs."""

from robmia_db.attacks.calibrated import lira_attack

ATTACK = {
    "title": "LiRA online, benign + PGD + verified queries (per-query LLRs summed)",
    "paper": "Carlini et al. IEEE S&P 2022 (multi-query LiRA), https://arxiv.org/abs/2112.03570; queries after Song, Shokri, Mittal CCS 2019",
    "needs": ["benign", "adversarial", "verified", "reference_models"],
    "params": {"location": "median", "variance": "global"},
    "decision_threshold": 0.0,
    "description": (
        "lira_online on the benign, the adversarial and the verified worst-case signals, each with its own "
        "IN and OUT Gaussians, log-likelihood ratios summed. Scored once per verified perturbation."
    ),
}


def score(ctx, params):
    return lira_attack(
        ctx, params, "lira_online_joint_verified", "online", ("benign", "adversarial", "verified")
    )
