-- title = "Logit margin (true minus best other)"
-- paper = "Carlini et al. Membership Inference Attacks From First Principles. IEEE S&P 2022. https://arxiv.org/abs/2112.03570 (a logit-scaled confidence)"
-- needs = ["signal"]
-- description = "z_y - max_{j != y} z_j; for imported probabilities, log p_y - log max_{j != y} p_j (the same number)."
SELECT model_key, example_id, margin AS score
FROM target
