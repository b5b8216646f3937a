-- title = "Prediction entropy (confident = member)"
-- paper = "Salem et al. ML-Leaks. NDSS 2019. https://arxiv.org/abs/1806.01246; Song & Mittal. USENIX Security 2021. https://arxiv.org/abs/2003.10595"
-- needs = ["signal"]
-- description = "Negative Shannon entropy of the probability vector; label-free."
SELECT model_key, example_id, -entropy AS score
FROM target
