-- title = "Cross-entropy loss (lower loss = member)"
-- paper = "Yeom, Giacomelli, Fredrikson, Jha. Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting. CSF 2018. https://arxiv.org/abs/1709.01604"
-- needs = ["signal"]
-- description = "Negative per-sample cross-entropy, computed in float64 from the float32 logits, so it keeps ordering where float32 confidence saturates."
SELECT model_key, example_id, -loss AS score
FROM target
