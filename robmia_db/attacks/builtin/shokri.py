"""Shokri et al.'s shadow-model attack: one attack model per class, trained on the reference models."""

from __future__ import annotations

import numpy as np

ATTACK = {
    "title": "Shokri et al.'s per-class attack models on reference (shadow) models",
    "paper": "Shokri, Stronati, Song, Shmatikov. Membership Inference Attacks Against Machine Learning Models. IEEE S&P 2017. https://arxiv.org/abs/1610.05820",
    "needs": ["signal", "reference_models"],
    "params": {"hidden": 64, "max_iter": 200, "seed": 0},
    "description": (
        "For each class y, a neural network (scikit-learn MLP, one hidden layer) trained on the probability "
        "vectors the reference (shadow) models gave their members (in) and non-members (out) of class y, "
        "classes balanced by subsampling; the target's examples of class y are scored with that class's "
        "model (member probability). A class whose references lack members or non-members scores 0.5."
    ),
}


def _fit_and_score(train_x, train_y, test_x, params) -> np.ndarray:
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(int(params["seed"]))
    members, nonmembers = np.flatnonzero(train_y), np.flatnonzero(~train_y)
    size = min(len(members), len(nonmembers))
    if size == 0:
        return np.full(len(test_x), 0.5)
    keep = np.sort(
        np.concatenate(
            [rng.choice(members, size, replace=False), rng.choice(nonmembers, size, replace=False)]
        )
    )
    model = MLPClassifier(
        hidden_layer_sizes=(int(params["hidden"]),), max_iter=int(params["max_iter"]),
        random_state=int(params["seed"]),
    )  # fmt: skip
    model.fit(train_x[keep], train_y[keep])
    return model.predict_proba(test_x)[:, list(model.classes_).index(True)]


def score(ctx, params):
    import warnings

    import pyarrow as pa
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    pieces = []
    # one thread: OpenMP threads spin on shared cores; the attack models here are small
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for key, target in ctx.target_rows(["probs"]).items():
            refs = ctx.reference_rows(key, ["probs"])  # this target's references only: never its membership
            scores = np.full(len(target["example_id"]), np.nan)
            for label in np.unique(target["label"]):
                rows = target["label"] == label
                train = refs["label"] == label
                scores[rows] = _fit_and_score(
                    refs["probs"][train], refs["is_member"][train], target["probs"][rows], params
                )
            pieces.append(
                pa.table(
                    {
                        "model_key": pa.repeat(pa.scalar(key, pa.string()), len(scores)),
                        "example_id": target["example_id"],
                        "score": scores,
                    }
                )
            )
    return pa.concat_tables(pieces)
