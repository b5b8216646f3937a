"""RMIA, offline (Zarifzadeh, Liu, Shokri, ICML 2024): Pr(x) from OUT references and the parameter a."""

from robmia_db.attacks.calibrated import rmia_attack

ATTACK = {
    "title": "RMIA offline (likelihood ratio against the population, OUT references only)",
    "paper": "Zarifzadeh, Liu, Shokri. Low-Cost High-Power Membership Inference Attacks. ICML 2024. https://arxiv.org/abs/2312.03262",
    "needs": ["signal", "reference_models"],
    "params": {"gamma": 2.0, "a": 0.3},
    "description": (
        "r(x) = p_y(x | target) / Pr(x) with Pr(x) = ((1 + a)/2) mean_OUT p_y(x) + (1 - a)/2 (a = 0.3 and "
        "gamma = 2 as the paper's CIFAR-10 configs); score = share of population examples z with "
        "r(x)/r(z) >= gamma. Population: the target's other examples (no labels needed; per target the "
        "score is monotone in r(x), so the ROC is r(x)'s). Works with a single reference model."
    ),
}


def score(ctx, params):
    return rmia_attack(ctx, params, "rmia_offline", "offline")
