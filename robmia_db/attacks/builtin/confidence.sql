-- title = "True-label confidence (the paper's attack)"
-- paper = "Song, Shokri, Mittal. Privacy Risks of Securing Machine Learning Models against Adversarial Examples. CCS 2019. https://arxiv.org/abs/1905.10291 (after Yeom et al. 2018)"
-- needs = ["signal"]
-- description = """
-- Softmax probability of the true label, float32 as the model produced it. On benign signals this is
-- the paper's I_B, on adversarial (PGD) signals I_A, on verified worst-case signals I_V. Saturated
-- confidences (1.0f) tie, as in the paper.
-- """
SELECT model_key, example_id, CAST(confidence AS DOUBLE) AS score
FROM target
