"""RMIA, online (Zarifzadeh, Liu, Shokri, ICML 2024): Pr(x) from IN and OUT references."""

from robmia_db.attacks.calibrated import rmia_attack

ATTACK = {
    "title": "RMIA online (likelihood ratio against the population, IN and OUT references)",
    "paper": "Zarifzadeh, Liu, Shokri. Low-Cost High-Power Membership Inference Attacks. ICML 2024. https://arxiv.org/abs/2312.03262",
    "needs": ["signal", "reference_models"],
    "params": {"gamma": 2.0},
    "description": (
        "r(x) = p_y(x | target) / Pr(x) with Pr(x) = 1/2 mean_IN p_y(x) + 1/2 mean_OUT p_y(x); score = share "
        "of population examples z (the target's other examples) with r(x)/r(z) >= gamma."
    ),
}


def score(ctx, params):
    return rmia_attack(ctx, params, "rmia_online", "online")
