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


def _probs(table) -> np.ndarray:
    column = table.column("probs").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1).astype(np.float64)


def score(ctx, params):
    import warnings

    import pyarrow as pa
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    target = ctx.sql("SELECT model_key, example_id, label, probs FROM target ORDER BY model_key, example_id")
    reference = ctx.sql(
        "SELECT target_model_key, label, is_member, probs FROM reference ORDER BY target_model_key, model_key, example_id"
    )
    t_keys = np.asarray(target.column("model_key").to_pylist())
    t_labels = target.column("label").to_numpy()
    t_probs = _probs(target)
    r_keys = np.asarray(reference.column("target_model_key").to_pylist())
    r_labels = reference.column("label").to_numpy()
    r_members = reference.column("is_member").to_numpy(zero_copy_only=False).astype(bool)
    r_probs = _probs(reference)
    scores = np.full(len(t_keys), np.nan)
    # one thread: OpenMP threads spin on shared cores; the attack models here are small
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for key in np.unique(t_keys):
            own = r_keys == key  # this target's references only: never its own membership
            for label in np.unique(t_labels[t_keys == key]):
                rows = (t_keys == key) & (t_labels == label)
                train = own & (r_labels == label)
                scores[rows] = _fit_and_score(r_probs[train], r_members[train], t_probs[rows], params)
    return pa.table({"model_key": t_keys, "example_id": target.column("example_id"), "score": scores})
