"""Store layer: the metadata tables, declared once as SQLModel classes (their DDL and typed rows).

One row per experiment, model, perturbation, attack version, metric: the small relational part of the
store. Their `CREATE TABLE` and `ALTER TABLE ... ADD COLUMN` statements are generated from these classes
(`schema.migrate` calls `sync_declared`), the writers take their column lists from them, and the Python API
returns rows as instances of them (`Store.models()` -> list[Model]). The per-sample tables (examples,
membership, signals, scores) are not here: they stay plain DDL in `schema.py`, Arrow in and Arrow out.

The DuckDB pitfalls of conventions section 4, handled: every float is declared `sa.Double` (a bare Python
float would become a 32-bit REAL); there are no integer autoincrement keys (keys are content hashes, so no
SERIAL); timestamps carry their time zone (TIMESTAMPTZ); dicts and lists are JSON. Tables without a primary
key in the store (metrics, skips, intervals: rewritten in place by `score`) name their natural key to the
ORM mapper only. No SQLAlchemy engine or session is used: the DDL is compiled with duckdb-engine's dialect
and run on our own connections, which avoids the engine's pool keeping the file locked.

Rules for changing a declared table: add fields at the end (stores extended by ALTER TABLE keep the same
column order as new ones, and positional INSERTs stay right), add a step to `schema.MIGRATIONS` so older
stores are brought up to the declaration, and update the pinned DDL in tests/test_schema_declaration.py.
A type change of an existing column needs an explicit migration: `sync_declared` refuses it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, TypeVar

import duckdb
import sqlalchemy as sa
from duckdb_engine import Dialect
from duckdb_engine.datatypes import HugeInteger
from sqlalchemy.schema import CreateColumn, CreateTable
from sqlmodel import Field, SQLModel

from robmia_db.errors import StoreError

TSTZ = sa.DateTime(timezone=True)


def _double(**kwargs: Any) -> Any:
    return Field(default=None, sa_type=sa.Double, **kwargs)


def _json(default_factory=None) -> Any:
    if default_factory is None:
        return Field(default=None, sa_type=sa.JSON)
    # an empty dict / list by default in Python, still nullable in the store (as it always was)
    return Field(default_factory=default_factory, sa_type=sa.JSON, sa_column_kwargs={"nullable": True})


def _key() -> Any:
    return Field(sa_column_kwargs={"nullable": False})


class Experiment(SQLModel, table=True):
    """One experiment: its latest spec text (each model keeps its own in `Model.spec_text`)."""

    __tablename__ = "experiments"

    name: str = Field(primary_key=True)
    description: str | None = None
    spec_path: str | None = None
    spec_text: str | None = None
    updated_at: datetime | None = Field(default=None, sa_type=TSTZ)


class Model(SQLModel, table=True):
    """One trained (or imported) network: identity columns, then provenance."""

    __tablename__ = "models"

    model_key: str = Field(primary_key=True)
    model_name: str = _key()
    experiment: str | None = None
    origin: str = _key()  # 'trained' or 'imported'
    dataset: str | None = None
    arch: str | None = None
    width: float | None = _double()
    defense: str | None = None
    eps: float | None = _double()
    seed: int | None = None
    model_index: int | None = None
    membership_scheme: str | None = None
    n_members: int | None = None
    n_nonmembers: int | None = None
    n_classes: int | None = None
    input_shape: list[int] | None = Field(default=None, sa_type=sa.ARRAY(sa.Integer))
    config: dict[str, Any] = _json(dict)
    status: str = Field(default="completed", sa_column_kwargs={"nullable": False})  # completed / failed
    error: str | None = None
    checkpoint: str | None = None
    dataset_checksum: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    package_versions: dict[str, str] = _json(dict)
    host: str | None = None
    device: str | None = None
    started_at: datetime | None = Field(default=None, sa_type=TSTZ)
    finished_at: datetime | None = Field(default=None, sa_type=TSTZ)
    train_seconds: float | None = _double()
    train_history: list[dict[str, Any]] = _json(list)
    checkpoint_sha256: str | None = None  # schema 6: checked before the checkpoint is used again
    spec_path: str | None = None  # schema 7: the spec that trained this model, as it was then
    spec_text: str | None = None


class Perturbation(SQLModel, table=True):
    """One way of presenting a model's examples (benign, adversarial, verified) whose signals are stored."""

    __tablename__ = "perturbations"

    signal_key: str = Field(primary_key=True)
    model_key: str = _key()
    name: str = _key()
    kind: str = _key()
    eps: float | None = _double()
    settings: dict[str, Any] | None = _json()
    n_rows: int | None = None
    member_acc: float | None = _double()
    nonmember_acc: float | None = _double()
    seconds: float | None = _double()
    created_at: datetime | None = Field(default=None, sa_type=TSTZ)


class Attack(SQLModel, table=True):
    """One scored attack version: name, normalised source and resolved parameters make its key."""

    __tablename__ = "attacks"

    attack_key: str = Field(primary_key=True)
    name: str = _key()
    title: str | None = None
    paper: str | None = None
    description: str | None = None
    language: str | None = None  # 'sql' or 'python'
    source_path: str | None = None
    source: str | None = None
    params: dict[str, Any] | None = _json()
    needs: list[str] | None = _json()
    created_at: datetime | None = Field(default=None, sa_type=TSTZ)
    # schema 8 (scoring integrity): after created_at, where step 8's ALTERs put them in older stores
    base_name: str | None = None  # the attack a parameter variant (`name[param=value]`) was made from
    origin: str | None = None  # builtin / user / stored
    decision_threshold: float | None = _double()  # the attack's own rule: member iff score >= it
    nonfinite: str | None = None  # the declared policy for NULL / NaN / inf scores ('error' or 'lowest')


class Metric(SQLModel, table=True):
    """The metrics of one attack on one model under one perturbation (exact integer numerators kept)."""

    __tablename__ = "metrics"
    __mapper_args__ = {"primary_key": ["attack_key", "model_key", "perturbation"]}

    attack_key: str = _key()
    model_key: str = _key()
    perturbation: str = _key()
    inputs_key: str = _key()  # hash of the signal keys the scores were computed from
    balanced_accuracy: float | None = _double()
    auc: float | None = _double()
    tpr_at_fpr_0: float | None = _double()
    tpr_at_fpr_1e3: float | None = _double()
    tpr_at_fpr_1e2: float | None = _double()
    advantage: float | None = _double()
    threshold: float | None = _double()
    n_members: int | None = None
    n_nonmembers: int | None = None
    tp_at_best: int | None = Field(default=None, sa_type=sa.BigInteger)
    fp_at_best: int | None = Field(default=None, sa_type=sa.BigInteger)
    auc_numerator2: int | None = Field(default=None, sa_type=HugeInteger)
    calibrated_accuracy: float | None = _double()  # at a threshold chosen on reference models
    calibrated_threshold: float | None = _double()
    n_reference_models: int | None = None
    seconds: float | None = _double()
    created_at: datetime | None = Field(default=None, sa_type=TSTZ)
    # schema 8 (scoring integrity): after created_at, where step 8's ALTERs put them in older stores
    tpr_at_fpr_1e4: float | None = _double()
    decision_accuracy: float | None = _double()  # 0.5 (TPR + 1 - FPR) at the attack's decision_threshold
    decision_tpr: float | None = _double()
    decision_fpr: float | None = _double()
    n_nonfinite: int | None = None  # scores mapped by a declared `nonfinite = "lowest"` policy
    calibration_note: str | None = None  # why calibrated_accuracy is NULL


class AttackSkip(SQLModel, table=True):
    """An attack that could not run on a model (and why), so reports can say so."""

    __tablename__ = "attack_skips"
    __mapper_args__ = {"primary_key": ["attack_key", "model_key", "reason"]}

    attack_key: str = _key()
    model_key: str = _key()
    perturbation: str | None = None
    reason: str = _key()
    created_at: datetime | None = Field(default=None, sa_type=TSTZ)


class MetricInterval(SQLModel, table=True):
    """Stratified bootstrap intervals beside one metrics row, keyed like it (schema 4, statistics)."""

    __tablename__ = "metric_intervals"
    __mapper_args__ = {"primary_key": ["attack_key", "model_key", "perturbation"]}

    attack_key: str = _key()
    model_key: str = _key()
    perturbation: str = _key()
    inputs_key: str = _key()
    n_resamples: int = _key()
    seed: int = Field(sa_type=sa.BigInteger, sa_column_kwargs={"nullable": False})
    confidence: float = Field(sa_type=sa.Double, sa_column_kwargs={"nullable": False})
    balanced_accuracy_ci_low: float | None = _double()
    balanced_accuracy_ci_high: float | None = _double()
    auc_ci_low: float | None = _double()
    auc_ci_high: float | None = _double()
    tpr_at_fpr_0_ci_low: float | None = _double()
    tpr_at_fpr_0_ci_high: float | None = _double()
    tpr_at_fpr_1e3_ci_low: float | None = _double()
    tpr_at_fpr_1e3_ci_high: float | None = _double()
    tpr_at_fpr_1e2_ci_low: float | None = _double()
    tpr_at_fpr_1e2_ci_high: float | None = _double()


class FleetMetric(SQLModel, table=True):
    """Metrics of one ROC over the concatenated scores of a fleet's targets (LiRA's pooled view; schema 8)."""

    __tablename__ = "fleet_metrics"
    __mapper_args__ = {"primary_key": ["attack_key", "perturbation", "recipe_key"]}

    attack_key: str = _key()
    perturbation: str = _key()
    recipe_key: str = _key()  # hash of the training recipe the pooled targets share
    model_key: str = _key()  # one pooled target (dataset / defense / eps); rm of it drops the row
    n_targets: int = _key()
    balanced_accuracy: float | None = _double()
    auc: float | None = _double()
    tpr_at_fpr_0: float | None = _double()
    tpr_at_fpr_1e4: float | None = _double()
    tpr_at_fpr_1e3: float | None = _double()
    tpr_at_fpr_1e2: float | None = _double()
    advantage: float | None = _double()
    threshold: float | None = _double()
    n_members: int | None = Field(default=None, sa_type=sa.BigInteger)
    n_nonmembers: int | None = Field(default=None, sa_type=sa.BigInteger)
    decision_accuracy: float | None = _double()
    decision_tpr: float | None = _double()
    decision_fpr: float | None = _double()
    created_at: datetime | None = Field(default=None, sa_type=TSTZ)


DECLARED: tuple[type[SQLModel], ...] = (
    Experiment,
    Model,
    Perturbation,
    Attack,
    Metric,
    AttackSkip,
    MetricInterval,
    FleetMetric,
)

_DIALECT = Dialect()
T = TypeVar("T", bound=SQLModel)


def columns(cls: type[SQLModel]) -> list[str]:
    return [column.name for column in cls.__table__.columns]


def create_table_sql(cls: type[SQLModel]) -> str:
    """The table's CREATE TABLE statement, compiled for DuckDB (one column a line, no trailing blanks)."""
    text = str(CreateTable(cls.__table__).compile(dialect=_DIALECT)).strip()
    return "\n".join(line.rstrip().replace("\t", "    ") for line in text.splitlines())


def declared_ddl() -> str:
    """Every declared table's DDL, as pinned in tests/golden/declared_tables.sql."""
    return "\n\n".join(create_table_sql(cls) + ";" for cls in DECLARED) + "\n"


def column_sql(cls: type[SQLModel], name: str) -> str:
    """One column's definition (`name TYPE [NOT NULL]`), as an ALTER TABLE ... ADD COLUMN takes it."""
    return str(CreateColumn(cls.__table__.columns[name]).compile(dialect=_DIALECT)).strip()


def _duckdb_type(cls: type[SQLModel], name: str) -> str:
    """The type DuckDB reports for the declared column (its information_schema spelling)."""
    definition = column_sql(cls, name).split(" ", 1)[1].replace(" NOT NULL", "")
    return {
        "DOUBLE PRECISION": "DOUBLE",
        "TIMESTAMP WITH TIME ZONE": "TIMESTAMP WITH TIME ZONE",
        "HugeInt": "HUGEINT",
    }.get(definition, definition)


def sync_declared(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Create each declared table the store lacks and add each declared column a table lacks.

    Returns the statements run. A stored column whose type differs from its declaration is an error: such a
    change needs an explicit migration step, never a silent re-typing.
    """
    statements = []
    stored: dict[str, dict[str, str]] = {}
    for table, column, kind in con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'main'"
    ).fetchall():
        stored.setdefault(table, {})[column] = kind
    for cls in DECLARED:
        name = cls.__tablename__
        if name not in stored:
            statements.append(create_table_sql(cls))
            continue
        for column in columns(cls):
            if column not in stored[name]:
                statements.append(
                    f"ALTER TABLE {name} ADD COLUMN {column_sql(cls, column).replace(' NOT NULL', '')}"
                )
            elif stored[name][column] != _duckdb_type(cls, column):
                raise StoreError(
                    f"table {name}: column {column} is {stored[name][column]} in the store but declared "
                    f"{_duckdb_type(cls, column)}; this needs a migration step, not a silent re-typing"
                )
    for statement in statements:
        con.execute(statement)
    return statements


def row_values(obj: SQLModel) -> list[Any]:
    """The row's values in column order, JSON columns serialised (for a parameterised INSERT)."""
    values = []
    for column in obj.__table__.columns:
        value = getattr(obj, column.name)
        if isinstance(column.type, sa.JSON) and value is not None:
            value = json.dumps(value)
        values.append(value)
    return values


def insert_sql(cls: type[SQLModel]) -> str:
    names = columns(cls)
    return f"INSERT INTO {cls.__tablename__} ({', '.join(names)}) VALUES ({', '.join(['?'] * len(names))})"


def from_rows(cls: type[T], names: list[str], rows: list[tuple]) -> list[T]:
    """Typed rows from a SELECT of the table's columns; JSON text is parsed back into dicts and lists."""
    json_columns = {c.name for c in cls.__table__.columns if isinstance(c.type, sa.JSON)}
    result = []
    for row in rows:
        data = {
            name: (json.loads(value) if name in json_columns and isinstance(value, str) else value)
            for name, value in zip(names, row)
        }
        result.append(cls.model_validate(data))
    return result


def read_table(
    con: duckdb.DuckDBPyConnection, cls: type[T], where: str = "", params: list | None = None
) -> list[T]:
    """Every row of a declared table (optionally filtered) as instances of its class."""
    names = columns(cls)
    rows = con.execute(f"SELECT {', '.join(names)} FROM {cls.__tablename__} {where}", params or []).fetchall()
    return from_rows(cls, names, rows)
