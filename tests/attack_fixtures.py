"""Test helpers for the attacks layer: synthetic stores built through the real import path, numpy references.

Nothing here trains: per-sample outputs come from a seeded `numpy.random.default_rng`, are written as the
generic npz (or the ccs2019 npz) that `robmia-db import` reads, and are imported with
`robmia_db.attacks.importers.import_outputs`. Members get a larger true-label logit gap than non-members by
a known margin, so every built-in attack has a known direction. The numpy references below restate the
formulas (the paper's float32 softmax, cross-entropy, Song & Mittal's modified entropy, the paper's
threshold loop) without using the code they check.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robmia_db.attacks.importers import import_outputs
from robmia_db.store.query import run_query

SQL_BUILTINS = ("confidence", "loss", "entropy", "mentropy", "margin", "adv_loss_gap")
SIGNAL_ATTACKS = ("confidence", "loss", "entropy", "mentropy", "margin")
REFERENCE_ATTACKS = (
    "class_thresholds", "attack_model", "shokri", "lira_online", "lira_offline", "rmia_offline", "rmia_online",
    "risk_score",
)  # fmt: skip
# reference attacks on several kinds at once, scored once per perturbation of the last kind they need
JOINT_REFERENCE_ATTACKS = ("lira_online_joint", "lira_offline_joint", "lira_online_joint_verified")
STORE_TABLES = (
    "models",
    "membership",
    "examples",
    "perturbations",
    "signals",
    "attacks",
    "scores",
    "metrics",
)

# float32 softmax saturates (p_y == 1.0f) once sum_{j != y} exp(z_j - z_y) < 2**-25, i.e. a true-label gap
# above about 17.3 + log(C - 1); float64 cross-entropy only saturates above about 37 + log(C - 1).
SATURATING_GAPS = {"nonmember": (8.0, 24.0), "member": (14.0, 30.0)}


@dataclass
class SyntheticOutputs:
    """One model's per-sample outputs: float32 logits per perturbation, with labels and membership."""

    labels: np.ndarray
    is_member: np.ndarray
    logits: dict[str, np.ndarray]
    example_id: np.ndarray | None = None
    kinds: dict[str, str] = field(default_factory=dict)
    eps: dict[str, float] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        """The generic npz layout of `robmia-db import --format npz`."""
        arrays: dict[str, np.ndarray] = {"labels": self.labels, "is_member": self.is_member}
        for name, values in self.logits.items():
            arrays[f"logits__{name}"] = values
        for name, kind in self.kinds.items():
            arrays[f"kind__{name}"] = np.array(kind)
        for name, eps in self.eps.items():
            arrays[f"eps__{name}"] = np.array(eps)
        if self.example_id is not None:
            arrays["example_id"] = self.example_id
        return arrays

    def save(self, path: Path) -> Path:
        np.savez(path, **self.arrays())
        return path


def synthetic_outputs(
    seed: int,
    n: int = 400,
    n_classes: int = 10,
    saturated: bool = False,
    adversarial: dict[str, float] | None = None,
    is_member: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    example_id: np.ndarray | None = None,
) -> SyntheticOutputs:
    """Benign logits plus one adversarial perturbation per `adversarial` entry (name -> mean gap drop).

    Members' true-label gap is larger by a known margin (untied: 1.5 logits on a N(2, 1) gap; saturated:
    uniform gaps shifted by 6, most of them beyond float32 saturation). An adversarial perturbation lowers
    the gap by `drop` for members and `drop + 2` for non-members, so members' loss rises less under attack.
    """
    rng = np.random.default_rng(seed)
    if is_member is None:
        is_member = rng.permutation(np.arange(n) < n // 2)
    if labels is None:
        labels = rng.integers(0, n_classes, n)
    rows = np.arange(n)
    if saturated:
        low = np.where(is_member, SATURATING_GAPS["member"][0], SATURATING_GAPS["nonmember"][0])
        high = np.where(is_member, SATURATING_GAPS["member"][1], SATURATING_GAPS["nonmember"][1])
        gap = rng.uniform(low, high)
    else:
        gap = rng.normal(2.0, 1.0, n) + 1.5 * is_member
    benign = rng.normal(0.0, 1.0, (n, n_classes))
    benign[rows, labels] = benign.max(axis=1) + gap
    logits = {"benign": benign.astype(np.float32)}
    for name, drop in (adversarial if adversarial is not None else {"pgd": 2.0}).items():
        perturbed = benign + rng.normal(0.0, 0.3, (n, n_classes))
        perturbed[rows, labels] -= rng.normal(drop, 0.5, n) + 2.0 * ~is_member
        logits[name] = perturbed.astype(np.float32)
    return SyntheticOutputs(np.asarray(labels, np.int64), np.asarray(is_member, bool), logits, example_id)


def import_synthetic(
    db: Path, folder: Path, outputs: dict[str, SyntheticOutputs], dataset: str | None = None
) -> dict[str, str]:
    """Write each model's npz and import it; returns model name -> model key.

    Without `dataset` each model gets its own (`synthetic-NAME`): its examples are its own, so it has no
    reference models. Models imported under one shared `dataset` are reference models for each other.
    """
    folder.mkdir(parents=True, exist_ok=True)
    keys = {}
    for name, model in outputs.items():
        path = model.save(folder / f"{name}.npz")
        record = import_outputs(db, path, "npz", name=name, dataset=dataset or f"synthetic-{name}")
        keys[name] = record.model_key
    return keys


def imported_population_outputs(
    seed: int, n_models: int = 3, n: int = 240, n_classes: int = 5
) -> dict[str, SyntheticOutputs]:
    """Outputs of `n_models` models over the same examples and labels, each on its own random half."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    example_id = np.arange(1000, 1000 + n)
    return {
        f"half{i}": synthetic_outputs(
            seed + 1 + i, n=n, n_classes=n_classes, labels=labels, example_id=example_id,
            is_member=rng.permutation(np.arange(n) < n // 2), adversarial={"pgd": 1.5},
        )
        for i in range(n_models)
    }  # fmt: skip


def paper_softmax(logits: np.ndarray) -> np.ndarray:
    """`softmax_by_row` of the paper's `inference_utils.py`, on float32 logits (so float32 throughout)."""
    logits = np.asarray(logits, dtype=np.float32)
    mx = np.max(logits, axis=-1, keepdims=True)
    exp = np.exp((logits - mx) / 1.0)
    denominator = np.sum(exp, axis=-1, keepdims=True)
    return exp / denominator


def reference_signals(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample signals restated from their definitions, in float64 from the float32 logits."""
    z = np.asarray(logits, dtype=np.float32).astype(np.float64)
    rows = np.arange(len(labels))
    z_max = z.max(axis=1, keepdims=True)
    log_partition = np.log(np.exp(z - z_max).sum(axis=1)) + z_max[:, 0]
    log_p = z - log_partition[:, None]
    p = np.exp(log_p)
    p_true = p[rows, labels]
    others = np.ones_like(p, dtype=bool)
    others[rows, labels] = False
    # Song & Mittal 2021, eq. (6): Mentr(F(x), y) = -(1 - F_y) log F_y - sum_{i != y} F_i log(1 - F_i)
    mentropy = -(1.0 - p_true) * log_p[rows, labels] - np.where(others, p * np.log1p(-p), 0.0).sum(axis=1)
    best_other = np.where(others, z, -np.inf).max(axis=1)
    return {
        "confidence": paper_softmax(logits)[rows, labels].astype(np.float64),
        "loss": log_partition - z[rows, labels],
        "entropy": -(p * log_p).sum(axis=1),
        "mentropy": mentropy,
        "margin": z[rows, labels] - best_other,
    }


def reference_scores(outputs: SyntheticOutputs, attack: str, perturbation: str) -> np.ndarray:
    """What each built-in SQL attack should score, oriented so that higher means member."""
    if attack == "adv_loss_gap":
        adversarial = reference_signals(outputs.logits[perturbation], outputs.labels)["loss"]
        benign = reference_signals(outputs.logits["benign"], outputs.labels)["loss"]
        return -(adversarial - benign)
    signals = reference_signals(outputs.logits[perturbation], outputs.labels)
    sign = {"confidence": 1.0, "loss": -1.0, "entropy": -1.0, "mentropy": -1.0, "margin": 1.0}[attack]
    return sign * signals[attack]


def paper_inference_loop(confidence1: np.ndarray, confidence2: np.ndarray) -> float:
    """The paper's `inference_via_confidence` threshold loop, literally (members first, non-members second)."""
    sort_confidence = np.sort(np.concatenate((confidence1, confidence2)))
    max_accuracy = 0.5
    for num in range(len(sort_confidence)):
        delta = sort_confidence[num]
        ratio1 = np.sum(confidence1 >= delta) / float(len(confidence1))
        ratio2 = np.sum(confidence2 >= delta) / float(len(confidence2))
        accuracy_now = 0.5 * (ratio1 + 1 - ratio2)
        if accuracy_now > max_accuracy:
            max_accuracy = accuracy_now
    return float(max_accuracy)


def best_threshold(values: np.ndarray, members: np.ndarray) -> float | None:
    """The largest t maximising TPR(t) - FPR(t) over observed values, by brute force; None if none beats 0.5."""
    values = np.asarray(values, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    n_members, n_nonmembers = int(members.sum()), int((~members).sum())
    best, best_gain = None, 0
    for t in np.unique(values)[::-1]:
        predicted = values >= t
        gain = int((predicted & members).sum()) * n_nonmembers - int((predicted & ~members).sum()) * n_members
        if gain > best_gain:
            best, best_gain = float(t), gain
    return best


def thre_setting_loop(train: np.ndarray, test: np.ndarray) -> float:
    """Song & Mittal's `_thre_setting`, literally: every candidate value in order, the first strict maximum."""
    value_list = np.concatenate((train, test))
    thre, max_acc = 0, 0
    for value in value_list:
        tr_ratio = np.sum(train >= value) / (len(train) + 0.0)
        te_ratio = np.sum(test < value) / (len(test) + 0.0)
        acc = 0.5 * (tr_ratio + te_ratio)
        if acc > max_acc:
            thre, max_acc = value, acc
    return float(thre)


def class_threshold_scores(
    target: dict[str, np.ndarray], references: list[dict[str, np.ndarray]], column: str = "confidence"
) -> np.ndarray:
    """Song & Mittal's class-dependent thresholds, restated: the target's signal minus its class's threshold
    set by their loop on the pooled references' members (train) and non-members (test) of that class."""
    values = np.concatenate([r[column] for r in references]).astype(np.float64)
    members = np.concatenate([r["is_member"] for r in references]).astype(bool)
    labels = np.concatenate([r["label"] for r in references])
    shift = np.zeros(len(target["label"]))
    for label in np.unique(target["label"]):
        same = labels == label
        with np.errstate(invalid="ignore"):
            tau = thre_setting_loop(values[same & members], values[same & ~members])
        shift[target["label"] == label] = tau
    return target[column].astype(np.float64) - shift


def signals_by_model(db: Path, perturbation: str) -> dict[str, dict[str, np.ndarray]]:
    """One perturbation's signal columns per model key, ordered by example id."""
    frame = run_query(
        db,
        "SELECT model_key, example_id, label, is_member, confidence FROM v_signals "
        "WHERE perturbation = $p ORDER BY model_key, example_id",
        params={"p": perturbation},
    ).to_pandas()
    return {
        key: {
            column: group[column].to_numpy() for column in ("example_id", "label", "is_member", "confidence")
        }
        for key, group in frame.groupby("model_key")
    }


def balanced_accuracy_at(threshold: float, values: np.ndarray, members: np.ndarray) -> float:
    predicted = np.asarray(values, dtype=np.float64) >= threshold
    members = np.asarray(members, dtype=bool)
    return 0.5 * (predicted[members].mean() + 1.0 - predicted[~members].mean())


def query(db: Path, sql: str, **params: Any) -> list[dict[str, Any]]:
    """Rows of a read-only query on the store, as dicts."""
    return run_query(db, sql, params=params or None).to_pylist()


def scores_of(
    db: Path, attack: str, model_key: str, perturbation: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(example_id, score, is_member) of one attack on one model and perturbation, by example id."""
    rows = run_query(
        db,
        "SELECT example_id, score, is_member FROM v_scores WHERE attack = $attack AND model_key = $model "
        "AND perturbation = $perturbation ORDER BY example_id",
        params={"attack": attack, "model": model_key, "perturbation": perturbation},
    )
    return (
        rows.column("example_id").to_numpy(),
        rows.column("score").to_numpy(),
        rows.column("is_member").to_numpy(zero_copy_only=False),
    )


def all_scores(db: Path) -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every stored score in one query: (attack, model_key, perturbation) -> (example_id, score, is_member)."""
    frame = run_query(
        db,
        "SELECT attack, model_key, perturbation, example_id, score, is_member FROM v_scores "
        "ORDER BY attack, model_key, perturbation, example_id",
    ).to_pandas()
    return {
        key: (group["example_id"].to_numpy(), group["score"].to_numpy(), group["is_member"].to_numpy(bool))
        for key, group in frame.groupby(["attack", "model_key", "perturbation"], sort=False)
    }


def all_metrics(db: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Every v_metrics row in one query, keyed by (attack, model_key, perturbation)."""
    rows = query(db, "SELECT * FROM v_metrics")
    keyed = {(r["attack"], r["model_key"], r["perturbation"]): r for r in rows}
    assert len(keyed) == len(rows), "more than one metrics row per (attack, model, perturbation)"
    return keyed


def metrics_row(db: Path, attack: str, model_key: str, perturbation: str) -> dict[str, Any]:
    rows = query(
        db,
        "SELECT * FROM v_metrics WHERE attack = $attack AND model_key = $model AND perturbation = $perturbation",
        attack=attack,
        model=model_key,
        perturbation=perturbation,
    )
    assert len(rows) == 1, f"{attack}/{perturbation}: {len(rows)} metrics rows"
    return rows[0]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def row_counts(db: Path) -> dict[str, int]:
    """Rows of every stored table (tables, not views: nothing may change behind the views either)."""
    counts = ", ".join(f"(SELECT count(*) FROM {table}) AS {table}" for table in STORE_TABLES)
    return query(db, f"SELECT {counts}")[0]


def write_attack(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def sql_attack(
    body: str, title: str = "test attack", needs: str = '["signal"]', params: str | None = None
) -> str:
    """A `.sql` attack file: TOML header in `-- ` comments, then the body."""
    header = [f'-- title = "{title}"', f"-- needs = {needs}"]
    if params is not None:
        header.append(f"-- params = {params}")
    return "\n".join(header) + "\n" + body + "\n"


def population_spec(
    path: Path, signals: tuple[str, ...] = ("benign",), epochs: int = 40, pgd_steps: int = 10
) -> Path:
    """A random_halves population of 3 tiny MLPs on 300 digits: reference models for each other.

    Signals are not part of a model's identity, so specs differing only in `signals` share the models.
    """
    blocks = {
        "benign": '[[signals]]\nkind = "benign"\nname = "benign"\n',
        "pgd": f'[[signals]]\nkind = "adversarial"\nname = "pgd"\neps = 0.1\nsteps = {pgd_steps}\n',
    }
    text = f"""[experiment]
name = "population"
description = "three digits MLPs on independent random halves of 300 examples"

[data]
dataset = "digits"
split_seed = 0

[membership]
scheme = "random_halves"
n_models = 3
population = 300

[model]
arch = "mlp"
options = {{ hidden = [64] }}

[training]
defenses = ["natural"]
seeds = [0]
epochs = {epochs}
batch_size = 32
optimizer = {{ name = "adam", lr = 0.01 }}

[runtime]
device = "cpu"
threads = 1

""" + "\n".join(blocks[s] for s in signals)
    path.write_text(text, encoding="utf-8")
    return path
