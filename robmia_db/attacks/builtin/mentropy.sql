-- title = "Modified entropy (Song & Mittal)"
-- paper = "Song, Mittal. Systematic Evaluation of Privacy Risks of Machine Learning Models. USENIX Security 2021. https://arxiv.org/abs/2003.10595"
-- needs = ["signal"]
-- description = "Negative modified entropy -(1-p_y) log p_y - sum_{i != y} p_i log(1-p_i): low for confident correct predictions, high for confident wrong ones."
SELECT model_key, example_id, -mentropy AS score
FROM target
