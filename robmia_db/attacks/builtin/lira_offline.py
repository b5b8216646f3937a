"""LiRA, offline (Carlini et al. 2022): only OUT references, a one-sided test as in the paper."""

from robmia_db.attacks.calibrated import lira_attack

ATTACK = {
    "title": "LiRA offline (one-sided test against the OUT Gaussian)",
    "paper": "Carlini, Chien, Nasr, Song, Terzis, Tramer. Membership Inference Attacks From First Principles. IEEE S&P 2022. https://arxiv.org/abs/2112.03570",
    "needs": ["signal", "reference_models"],
    "params": {"location": "median", "variance": "global"},
    "decision_threshold": 2.3263478740408408,
    "description": (
        "z = (phi - mu_out) / s_out from the reference models that did not train on the example: the paper's "
        "one-sided Lambda = Phi(z), stored as z so that it never saturates (the reference code's offline "
        "score is two-sided, log N(phi; mu_out, s_out^2), and also flags phi far below mu_out). Member iff "
        "z >= 2.326, i.e. phi lies in the OUT distribution's upper 1% tail."
    ),
}


def score(ctx, params):
    return lira_attack(ctx, params, "lira_offline", "offline", None)
