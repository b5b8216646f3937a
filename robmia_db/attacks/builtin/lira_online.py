"""LiRA, online (Carlini et al. 2022): per-example IN and OUT Gaussians of phi on the reference models."""

from robmia_db.attacks.calibrated import lira_attack

ATTACK = {
    "title": "LiRA online (IN and OUT Gaussians of the logit-scaled confidence per example)",
    "paper": "Carlini, Chien, Nasr, Song, Terzis, Tramer. Membership Inference Attacks From First Principles. IEEE S&P 2022. https://arxiv.org/abs/2112.03570",
    "needs": ["signal", "reference_models"],
    "params": {"location": "median", "variance": "global"},
    "decision_threshold": 0.0,
    "description": (
        "Log-likelihood ratio log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2) of the target's "
        "phi = log p_y - log(1 - p_y) under Gaussians fitted to the reference models that trained on the "
        "example (IN) and those that did not (OUT); member iff LLR >= 0. location: median (the reference "
        "code's default) or mean; variance: global (one std per side, of the per-example-centred values, "
        "as TF Privacy's fix_variance; better with few references) or per_example."
    ),
}


def score(ctx, params):
    return lira_attack(ctx, params, "lira_online", "online", None)
