"""Attacks layer: import per-sample outputs made elsewhere, so attacks re-score them without retraining.

`ccs2019`: the paper authors' npz (`output_{train,test}_{benign,adversarial}` float32 softmax, `{train,test}_label`;
train rows are members). `npz`: a generic layout, documented in the README:
    labels      (N,) int              true labels in [0, C)
    is_member   (N,) bool             membership
    probs__NAME or logits__NAME  (N, C) float   one per perturbation NAME (e.g. probs__benign, logits__pgd)
    kind__NAME  () str, optional       benign | adversarial | verified (default: from the name)
    eps__NAME   () float, optional     perturbation budget
    example_id  (N,) int, optional     ids (default 0..N-1)
Input is checked before anything is written: a bad file imports nothing.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from robmia_db.errors import ImportDataError
from robmia_db.spec.identity import content_key
from robmia_db.store import ingest
from robmia_db.store.connection import writing
from robmia_db.store.signals import signal_table, signals_from_logits, signals_from_probs
from robmia_db.store.tables import Model

CCS2019_KEYS = (
    "output_train_benign", "output_test_benign", "output_train_adversarial", "output_test_adversarial",
    "train_label", "test_label",
)  # fmt: skip


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise ImportDataError(f"{path}: file not found")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ImportDataError(f"{path}: not a readable npz file ({exc})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ImportDataError(f"{path}: is a single .npy array, not an npz archive of named arrays")
    try:
        with loaded as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ImportDataError(f"{path}: not a readable npz file ({exc})") from None
    except MemoryError:  # a header may claim any shape (1e12 rows): refuse, do not crash
        raise ImportDataError(f"{path}: an array's header claims more than memory holds") from None


def _check_labels(path: Path, key: str, labels: np.ndarray, n_classes: int) -> np.ndarray:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        if (
            labels.ndim == 1
            and np.issubdtype(labels.dtype, np.floating)
            and np.all(labels == np.round(labels))
        ):
            labels = labels.astype(np.int64)
        else:
            raise ImportDataError(
                f"{path}: {key}: labels must be a 1-D integer array (got {labels.dtype}{labels.shape})"
            )
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ImportDataError(
            f"{path}: {key}: labels must be in [0, {n_classes}) (got {labels.min()}..{labels.max()})"
        )
    return labels.astype(np.int64)


def _check_matrix(path: Path, key: str, values: np.ndarray, n_rows: int, probabilities: bool) -> np.ndarray:
    if values.ndim != 2 or values.shape[0] != n_rows:
        raise ImportDataError(f"{path}: {key}: expected shape ({n_rows}, C), got {values.shape}")
    if not np.issubdtype(values.dtype, np.floating):
        raise ImportDataError(f"{path}: {key}: must be a float array (got {values.dtype})")
    if not np.all(np.isfinite(values)):
        bad = int(np.argwhere(~np.isfinite(values))[0][0])
        raise ImportDataError(f"{path}: {key}: contains NaN or infinite values (first at row {bad})")
    if probabilities:
        if values.min() < 0:
            raise ImportDataError(f"{path}: {key}: probabilities must be >= 0 (min {values.min():.3g})")
        sums = values.astype(np.float64).sum(axis=1)
        worst = int(np.argmax(np.abs(sums - 1)))
        if abs(sums[worst] - 1) > 1e-3:
            raise ImportDataError(
                f"{path}: {key}: rows must sum to 1 (row {worst} sums to {sums[worst]:.6g}); pass logits as logits__NAME"
            )
    return values.astype(np.float32) if probabilities else values


def _scalar_number(path: Path, key: str, value: np.ndarray) -> float:
    if (
        value.shape != ()
        or not np.issubdtype(value.dtype, np.number)
        or np.issubdtype(value.dtype, np.complexfloating)
    ):
        raise ImportDataError(f"{path}: {key}: must be one real number (got {value.dtype}{value.shape})")
    number = float(value)
    if not np.isfinite(number):
        raise ImportDataError(f"{path}: {key}: must be finite (got {number})")
    return number


def _kind_from_name(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith(("verified", "ver")):
        return "verified"
    if lowered.startswith(("adv", "pgd", "fgsm", "attack")):
        return "adversarial"
    return "benign"


def read_ccs2019(path: Path) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    data = _load_npz(path)
    missing = [k for k in CCS2019_KEYS if k not in data]
    if missing:
        raise ImportDataError(f"{path}: not a ccs2019 output file: missing array {missing[0]!r}")
    n_train, n_test = len(data["train_label"]), len(data["test_label"])
    if n_train == 0 or n_test == 0:
        raise ImportDataError(
            f"{path}: needs both members and non-members (train rows are members, test rows non-members); got {n_train} and {n_test}"
        )
    for key in CCS2019_KEYS[:4]:
        if data[key].ndim != 2:
            raise ImportDataError(
                f"{path}: {key}: expected shape (N, C) of probabilities, got {data[key].shape}"
            )
    n_classes = data["output_train_benign"].shape[1]
    train_labels = _check_labels(path, "train_label", data["train_label"], n_classes)
    test_labels = _check_labels(path, "test_label", data["test_label"], n_classes)
    perturbations = []
    for name, kind in (("benign", "benign"), ("adversarial", "adversarial")):
        train = _check_matrix(path, f"output_train_{name}", data[f"output_train_{name}"], n_train, True)
        test = _check_matrix(path, f"output_test_{name}", data[f"output_test_{name}"], n_test, True)
        if train.shape[1] != n_classes or test.shape[1] != n_classes:
            raise ImportDataError(f"{path}: output_*_{name}: class counts differ between arrays")
        perturbations.append(
            {"name": name, "kind": kind, "probs": np.concatenate([train, test]), "eps": None}
        )
    labels = np.concatenate([train_labels, test_labels])
    is_member = np.concatenate([np.ones(n_train, bool), np.zeros(n_test, bool)])
    return labels, is_member, perturbations


def read_generic_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], np.ndarray | None]:
    data = _load_npz(path)
    for key in ("labels", "is_member"):
        if key not in data:
            raise ImportDataError(
                f"{path}: missing array {key!r} (see `robmia-db import --help` for the layout)"
            )
    is_member = data["is_member"]
    if is_member.ndim != 1 or is_member.dtype != bool:
        if is_member.ndim == 1 and set(np.unique(is_member).tolist()) <= {0, 1}:
            is_member = is_member.astype(bool)
        else:
            raise ImportDataError(f"{path}: is_member: must be a 1-D boolean (or 0/1) array")
    n = len(is_member)
    if is_member.all() or not is_member.any():
        raise ImportDataError(f"{path}: is_member: needs both members and non-members")
    names = sorted({k.split("__", 1)[1] for k in data if k.startswith(("probs__", "logits__"))})
    if not names:
        raise ImportDataError(f"{path}: no perturbation arrays (probs__NAME or logits__NAME)")
    perturbations = []
    n_classes = None
    for name in names:
        if f"probs__{name}" in data and f"logits__{name}" in data:
            raise ImportDataError(f"{path}: perturbation {name!r} has both probs__ and logits__ arrays")
        is_probs = f"probs__{name}" in data
        key = f"probs__{name}" if is_probs else f"logits__{name}"
        values = _check_matrix(path, key, data[key], n, is_probs)
        if n_classes is None:
            n_classes = values.shape[1]
        elif values.shape[1] != n_classes:
            raise ImportDataError(f"{path}: {key}: has {values.shape[1]} classes, others have {n_classes}")
        kind = str(data[f"kind__{name}"]) if f"kind__{name}" in data else _kind_from_name(name)
        if kind not in ("benign", "adversarial", "verified"):
            raise ImportDataError(
                f"{path}: kind__{name}: must be benign, adversarial or verified (got {kind!r})"
            )
        eps = _scalar_number(path, f"eps__{name}", data[f"eps__{name}"]) if f"eps__{name}" in data else None
        perturbations.append(
            {"name": name, "kind": kind, ("probs" if is_probs else "logits"): values, "eps": eps}
        )
    labels = _check_labels(path, "labels", data["labels"], int(n_classes))
    if len(labels) != n:
        raise ImportDataError(f"{path}: labels has {len(labels)} rows, is_member has {n}")
    example_id = None
    if "example_id" in data:
        example_id = data["example_id"].astype(np.int64)
        if example_id.shape != (n,) or len(np.unique(example_id)) != n:
            raise ImportDataError(f"{path}: example_id must be {n} distinct integers")
    return labels, is_member, perturbations, example_id


@dataclass
class ImportResult:
    """What `import` did: `action` is "imported", "replaced" (same arrays, same name: rewritten in place)
    or "already stored" (same arrays stored under another name: nothing written, `stored_name` says which)."""

    model_key: str
    model_name: str
    action: str
    stored_name: str | None
    n_members: int
    n_nonmembers: int
    n_classes: int
    record: Model

    def describe(self) -> str:
        if self.action == "already stored":
            return (
                f"already stored as {self.stored_name} ({self.model_key}): the same arrays make the same model; "
                f"nothing imported and not renamed to {self.model_name} "
                f"(`robmia-db rm {self.model_key} --yes` first to import it under the new name)"
            )
        return (
            f"{self.action} {self.model_name} ({self.model_key}): {self.n_members} members, "
            f"{self.n_nonmembers} non-members, {self.n_classes} classes"
        )


def import_outputs(
    db_path: str | Path,
    path: str | Path,
    fmt: str,
    name: str | None = None,
    experiment: str = "imported",
    dataset: str | None = None,
    defense: str | None = None,
) -> ImportResult:
    """Validate an output file, then write it as one model (all or nothing).

    The model key is a hash of the file's content: the same arrays imported again under their stored name
    are rewritten in place; under another name nothing is written and the result says where they are.
    """
    path = Path(path)
    if fmt == "ccs2019":
        labels, is_member, perturbations = read_ccs2019(path)
        example_ids = None
    elif fmt == "npz":
        labels, is_member, perturbations, example_ids = read_generic_npz(path)
    else:
        raise ImportDataError(f"unknown import format {fmt!r} (ccs2019 or npz)")
    if example_ids is None:
        example_ids = np.arange(len(labels), dtype=np.int64)
    if is_member.all() or not is_member.any():
        raise ImportDataError(f"{path}: needs both members and non-members")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    order = np.argsort(example_ids, kind="stable")
    examples_digest = hashlib.sha256(
        np.ascontiguousarray(example_ids[order]).tobytes() + np.ascontiguousarray(labels[order]).tobytes()
    ).hexdigest()[:16]
    membership_digest = hashlib.sha256(
        np.ascontiguousarray(example_ids[order]).tobytes() + np.ascontiguousarray(is_member[order]).tobytes()
    ).hexdigest()
    model_name = name or path.stem
    if not model_name or any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in model_name):
        raise ImportDataError(
            f"{path}: model name {model_name!r} is empty or contains control characters; give --name"
        )
    model_key = content_key({"imported": digest, "format": fmt})
    n_classes = int(
        (perturbations[0].get("probs") if "probs" in perturbations[0] else perturbations[0]["logits"]).shape[
            1
        ]
    )
    dataset_name = dataset or f"imported:{model_name}"
    records = []
    for item in perturbations:
        settings = {"kind": item["kind"], "imported_from": path.name, "format": fmt, "array": item["name"]}
        signal_key = content_key({"model_key": model_key, "perturbation": settings})
        if "probs" in item:
            columns = signals_from_probs(item["probs"], labels)
        else:
            columns = signals_from_logits(item["logits"], labels)
        table = signal_table(signal_key, model_key, example_ids, labels, is_member, columns)
        records.append(
            ingest.PerturbationRecord(
                signal_key, model_key, item["name"], item["kind"], item["eps"], settings, table
            )
        )
    record = Model(
        model_key=model_key, model_name=model_name, experiment=experiment, origin="imported", dataset=dataset_name,
        defense=defense, membership_scheme="imported", n_members=int(is_member.sum()),
        n_nonmembers=int((~is_member).sum()), n_classes=n_classes,
        config={
            "imported_from": str(path),
            "sha256": digest,
            "format": fmt,
            "membership_sha256": membership_digest,
            # reference models must see the same examples and classes: the id/label digest is in the recipe
            "recipe": {"dataset": dataset, "defense": defense, "n_classes": n_classes, "examples": examples_digest}
            if dataset
            else None,
        },
        finished_at=datetime.now(timezone.utc),
    )  # fmt: skip
    membership = pa.table(
        {"example_id": pa.array(example_ids.astype(np.int32)), "is_member": pa.array(is_member)}
    )
    examples = pa.table(
        {
            "example_id": pa.array(example_ids.astype(np.int32)),
            "label": pa.array(labels.astype(np.int32)),
            "origin_split": pa.array(np.where(is_member, "train", "test")),
        }
    )
    with writing(db_path) as con:
        stored = con.execute("SELECT model_name FROM models WHERE model_key = ?", [model_key]).fetchall()
        stored_name = stored[0][0] if stored else None
        if stored_name is not None and stored_name != model_name:
            action = "already stored"
        else:
            action = "replaced" if stored_name is not None else "imported"
            if dataset:
                _check_same_examples(con, path, dataset, examples)
            ingest.write_model(con, record, membership, examples, records)
    return ImportResult(
        model_key, model_name, action, stored_name, record.n_members or 0, record.n_nonmembers or 0, n_classes,
        record,
    )  # fmt: skip


def _check_same_examples(con, path: Path, dataset: str, examples: pa.Table) -> None:
    """`--dataset NAME` claims these rows are NAME's examples: ids already stored must carry the same labels.

    Otherwise `v_membership.label` (read from the stored examples) would be another array's labels.
    """
    con.register("incoming_examples", examples)
    try:
        n_differ, first = con.execute(
            """
            SELECT count(*), min(i.example_id || ': stored ' || e.label || ', file ' || i.label)
            FROM incoming_examples i JOIN examples e ON e.dataset = ? AND e.example_id = i.example_id
            WHERE e.label != i.label
            """,
            [dataset],
        ).fetchall()[0]
    finally:
        con.unregister("incoming_examples")
    if n_differ:
        raise ImportDataError(
            f"{path}: --dataset {dataset}: {n_differ} of {examples.num_rows} examples have other labels than the "
            f"stored {dataset!r} examples of the same id (e.g. id {first}): these are not the same examples; "
            "import them under their own --dataset name (or without --dataset)"
        )
