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


IMPORT_MEMORY_LIMIT = "1GB"
CHUNK_ROWS = 262_144  # rows per streamed chunk: ~10 MB of float32 probabilities at 10 classes


class _Archive:
    """An npz read lazily: small arrays (labels, ids) whole, (N, C) matrices streamed in row chunks.

    Memory then holds one chunk of each matrix, not the file: importing 1e7 rows took 6.1 GB read whole.
    """

    def __init__(self, path: Path):
        if not path.exists():
            raise ImportDataError(f"{path}: file not found")
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as exc:
            if path.read_bytes()[:6] == b"\x93NUMPY":
                raise ImportDataError(
                    f"{path}: is a single .npy array, not an npz archive of named arrays"
                ) from None
            raise ImportDataError(f"{path}: not a readable npz file ({exc})") from None
        self.members = {n[:-4]: n for n in self.zip.namelist() if n.endswith(".npy")}
        self.files = list(self.members)

    def __contains__(self, key: str) -> bool:
        return key in self.members

    def __iter__(self):
        return iter(self.files)

    def _open(self, key: str):
        handle = self.zip.open(self.members[key])
        try:
            version = np.lib.format.read_magic(handle)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = reader(handle)
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            handle.close()
            raise ImportDataError(f"{self.path}: {key}: not a readable array ({exc})") from None
        if dtype.hasobject:
            handle.close()
            raise ImportDataError(f"{self.path}: {key}: object arrays are not read (allow_pickle is off)")
        return handle, shape, fortran, dtype

    def shape(self, key: str) -> tuple[int, ...]:
        handle, shape, _, _ = self._open(key)
        handle.close()
        return shape

    def dtype(self, key: str) -> np.dtype:
        handle, _, _, dtype = self._open(key)
        handle.close()
        return dtype

    def __getitem__(self, key: str) -> np.ndarray:
        handle, shape, fortran, dtype = self._open(key)
        with handle:
            count = int(np.prod(shape, dtype=object))
            data = handle.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise ImportDataError(f"{self.path}: {key}: truncated (header says shape {shape})")
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")

    def chunks(self, key: str, rows: int = CHUNK_ROWS):
        """(first row, rows x C array) pieces of a 2-D array, in order."""
        handle, shape, fortran, dtype = self._open(key)
        with handle:
            if fortran:  # column-major cannot be read by rows: the rare case is read whole
                whole = np.frombuffer(handle.read(), dtype=dtype).reshape(shape, order="F")
                for start in range(0, shape[0], rows):
                    yield start, np.ascontiguousarray(whole[start : start + rows])
                return
            width = int(np.prod(shape[1:], dtype=object)) * dtype.itemsize
            for start in range(0, shape[0], rows):
                n = min(rows, shape[0] - start)
                data = handle.read(n * width)
                if len(data) != n * width:
                    raise ImportDataError(f"{self.path}: {key}: truncated (header says shape {shape})")
                yield start, np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))


def _load_npz(path: Path) -> _Archive:
    return _Archive(path)


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


def _check_matrix_header(path: Path, data: _Archive, key: str, n_rows: int) -> int:
    """Shape and dtype from the header alone; returns the number of classes."""
    shape, dtype = data.shape(key), data.dtype(key)
    if len(shape) != 2 or shape[0] != n_rows:
        raise ImportDataError(f"{path}: {key}: expected shape ({n_rows}, C), got {shape}")
    if not np.issubdtype(dtype, np.floating):
        raise ImportDataError(f"{path}: {key}: must be a float array (got {dtype})")
    return int(shape[1])


def _check_chunk(path: Path, key: str, values: np.ndarray, offset: int, probabilities: bool) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        bad = offset + int(np.argwhere(~np.isfinite(values))[0][0])
        raise ImportDataError(f"{path}: {key}: contains NaN or infinite values (first at row {bad})")
    if probabilities:
        if values.min() < 0:
            raise ImportDataError(f"{path}: {key}: probabilities must be >= 0 (min {values.min():.3g})")
        sums = values.astype(np.float64).sum(axis=1)
        worst = int(np.argmax(np.abs(sums - 1)))
        if abs(sums[worst] - 1) > 1e-3:
            raise ImportDataError(
                f"{path}: {key}: rows must sum to 1 (row {offset + worst} sums to {sums[worst]:.6g}); pass logits as logits__NAME"
            )
    return values.astype(np.float32) if probabilities else values


def _matrix_chunks(path: Path, data: _Archive, keys: list[str], probabilities: bool):
    """Validated chunks of one perturbation's matrix (several keys are stacked, as ccs2019's train + test)."""
    offset = 0
    for key in keys:
        for start, values in data.chunks(key):
            yield offset + start, _check_chunk(path, key, values, offset + start, probabilities)
        offset += data.shape(key)[0]


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
        if len(data.shape(key)) != 2:
            raise ImportDataError(
                f"{path}: {key}: expected shape (N, C) of probabilities, got {data.shape(key)}"
            )
    n_classes = data.shape("output_train_benign")[1]
    train_labels = _check_labels(path, "train_label", data["train_label"], n_classes)
    test_labels = _check_labels(path, "test_label", data["test_label"], n_classes)
    perturbations = []
    for name, kind in (("benign", "benign"), ("adversarial", "adversarial")):
        keys = [f"output_train_{name}", f"output_test_{name}"]
        classes = {_check_matrix_header(path, data, k, n) for k, n in zip(keys, (n_train, n_test))}
        if classes != {n_classes}:
            raise ImportDataError(f"{path}: output_*_{name}: class counts differ between arrays")
        perturbations.append(
            {
                "name": name,
                "kind": kind,
                "probs": True,
                "chunks": (data, keys),
                "eps": None,
                "n_classes": n_classes,
            }
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
        classes = _check_matrix_header(path, data, key, n)
        if n_classes is None:
            n_classes = classes
        elif classes != n_classes:
            raise ImportDataError(f"{path}: {key}: has {classes} classes, others have {n_classes}")
        kind = str(data[f"kind__{name}"]) if f"kind__{name}" in data else _kind_from_name(name)
        if kind not in ("benign", "adversarial", "verified"):
            raise ImportDataError(
                f"{path}: kind__{name}: must be benign, adversarial or verified (got {kind!r})"
            )
        eps = _scalar_number(path, f"eps__{name}", data[f"eps__{name}"]) if f"eps__{name}" in data else None
        perturbations.append(
            {
                "name": name,
                "kind": kind,
                "probs": is_probs,
                "chunks": (data, [key]),
                "eps": eps,
                "n_classes": classes,
            }
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
    for item in perturbations:  # every value checked before the store is touched: a bad file imports nothing
        for _ in _matrix_chunks(path, *item["chunks"], item["probs"]):
            pass
    digest = _file_sha256(path)
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
    n_classes = int(perturbations[0]["n_classes"])
    dataset_name = dataset or f"imported:{model_name}"
    records = []
    for item in perturbations:
        settings = {"kind": item["kind"], "imported_from": path.name, "format": fmt, "array": item["name"]}
        signal_key = content_key({"model_key": model_key, "perturbation": settings})
        chunks = _signal_chunks(path, item, signal_key, model_key, example_ids, labels, is_member)
        records.append(
            ingest.PerturbationRecord(
                signal_key, model_key, item["name"], item["kind"], item["eps"], settings, chunks
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
            # dictionary-encoded: a string per row would cost ~9 bytes a row at 1e8 rows
            "origin_split": pa.DictionaryArray.from_arrays(
                pa.array((~is_member).astype(np.int8)), pa.array(["train", "test"])
            ),
        }
    )
    # a memory limit makes DuckDB write a large transaction's rows to the file as it goes instead of
    # holding them until COMMIT (3.6 GB at 1e7 rows without it, 2.6 GB with it: benchmarks/bench_memory.py)
    with writing(db_path, memory_limit=IMPORT_MEMORY_LIMIT) as con:
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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _signal_chunks(path, item, signal_key, model_key, example_ids, labels, is_member):
    """One perturbation's signal rows, one chunk of the file at a time (the write transaction pulls them)."""
    for start, values in _matrix_chunks(path, *item["chunks"], item["probs"]):
        rows = slice(start, start + len(values))
        compute = signals_from_probs if item["probs"] else signals_from_logits
        columns = compute(values, labels[rows])
        yield signal_table(signal_key, model_key, example_ids[rows], labels[rows], is_member[rows], columns)


def _check_same_examples(con, path: Path, dataset: str, examples: pa.Table) -> None:
    """`--dataset NAME` claims these rows are NAME's examples: ids already stored must carry the same labels,
    or `v_membership.label` (read from the stored examples) would be another array's labels.
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
