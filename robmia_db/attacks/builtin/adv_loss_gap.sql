-- title = "Adversarial loss gap (how little the loss rises under PGD)"
-- paper = "Song, Shokri, Mittal. CCS 2019. https://arxiv.org/abs/1905.10291 (robust models fit the eps-ball around members)"
-- needs = ["benign", "adversarial"]
-- description = """
-- Negative increase of the cross-entropy from the benign input to the PGD input. A robust model was
-- trained to keep its members' neighbourhoods correct, so the loss of members rises less. Scored once
-- per adversarial perturbation, labelled with that perturbation's name.
-- """
SELECT a.model_key, a.example_id, -(a.loss - b.loss) AS score
FROM adversarial a
JOIN benign b USING (model_key, example_id)
