"""A trained attack model on reference models' signals (ML-Leaks / Song & Mittal style, one global model)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

ATTACK = {
    "title": "Trained attack model on reference models' signals (one global classifier, ML-Leaks style)",
    "paper": "Salem, Zhang, Humbert, Berrang, Fritz, Backes. ML-Leaks. NDSS 2019. https://arxiv.org/abs/1806.01246; Song, Mittal. USENIX Security 2021 (NN attack on sorted probabilities + label-free features). Not Shokri et al.'s per-class shadow attack models",
    "needs": ["signal", "reference_models"],
    "params": {"max_iter": 100, "seed": 0},
    "description": (
        "A scikit-learn gradient-boosted classifier on the sorted probability vector plus confidence, loss, "
        "entropy, modified entropy and margin, trained on the reference models' members and non-members "
        "(classes balanced by subsampling), then applied to the target model; the score is its member probability. "
        "One model for all classes and no label input: ML-Leaks' design, not Shokri et al.'s per-class models."
    ),
}

FEATURES = ["probs", "confidence", "loss", "entropy", "mentropy", "margin"]


def _features(rows: dict[str, np.ndarray]) -> np.ndarray:
    probs = np.sort(rows["probs"], axis=1)[:, ::-1]
    scalars = np.stack([rows[name] for name in FEATURES[1:]], axis=1)
    return np.nan_to_num(np.concatenate([probs, scalars], axis=1), posinf=1e6, neginf=-1e6)


def score(ctx, params):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    pieces = []
    for model_key, rows in ctx.target_rows(FEATURES).items():
        refs = ctx.reference_rows(model_key, FEATURES)  # this target's references only
        labels = refs["is_member"]
        # balance the classes by subsampling the larger one (class_weight makes the fit 20x slower)
        rng = np.random.default_rng(int(params["seed"]))
        members, nonmembers = np.flatnonzero(labels), np.flatnonzero(~labels)
        size = min(len(members), len(nonmembers))
        keep = np.sort(
            np.concatenate(
                [rng.choice(members, size, replace=False), rng.choice(nonmembers, size, replace=False)]
            )
        )
        refs, labels = {name: refs[name][keep] for name in FEATURES}, labels[keep]
        classifier = HistGradientBoostingClassifier(
            max_iter=int(params["max_iter"]), random_state=int(params["seed"])
        )
        # OpenMP threads spin on 2 shared cores and make the fit 100x slower; one thread is fast enough here
        with threadpool_limits(1):
            classifier.fit(_features(refs), labels)
            member_scores = classifier.predict_proba(_features(rows))[
                :, list(classifier.classes_).index(True)
            ]
        pieces.append(
            pa.table(
                {
                    "model_key": pa.repeat(pa.scalar(model_key, pa.string()), len(member_scores)),
                    "example_id": rows["example_id"],
                    "score": member_scores,
                }
            )
        )
    return pa.concat_tables(pieces)
