"""The store's DDL at schema version 3 (robmia_db/store/schema.py at commit 134d271), frozen for tests.

Stores created by robmia-db before the metadata tables were declared in SQLModel are built from this text,
so migration tests start from what real older stores hold, not from today's declaration.
"""

from __future__ import annotations

import duckdb

V3_MIGRATIONS: list[str] = [
    # 1: the core tables
    """
    CREATE TABLE experiments (
        name VARCHAR PRIMARY KEY,
        description VARCHAR,
        spec_path VARCHAR,
        spec_text VARCHAR,
        updated_at TIMESTAMPTZ
    );
    CREATE TABLE models (
        model_key VARCHAR PRIMARY KEY,
        model_name VARCHAR NOT NULL,
        experiment VARCHAR,
        origin VARCHAR NOT NULL,            -- 'trained' or 'imported'
        dataset VARCHAR,
        arch VARCHAR,
        width DOUBLE,
        defense VARCHAR,
        eps DOUBLE,
        seed INTEGER,
        model_index INTEGER,
        membership_scheme VARCHAR,
        n_members INTEGER,
        n_nonmembers INTEGER,
        n_classes INTEGER,
        input_shape INTEGER[],
        config JSON,
        status VARCHAR NOT NULL,            -- 'completed' or 'failed'
        error VARCHAR,
        checkpoint VARCHAR,
        dataset_checksum VARCHAR,
        git_commit VARCHAR,
        git_dirty BOOLEAN,
        package_versions JSON,
        host VARCHAR,
        device VARCHAR,
        started_at TIMESTAMPTZ,
        finished_at TIMESTAMPTZ,
        train_seconds DOUBLE,
        train_history JSON
    );
    CREATE TABLE examples (
        dataset VARCHAR NOT NULL,
        example_id INTEGER NOT NULL,
        label INTEGER NOT NULL,
        origin_split VARCHAR
    );
    CREATE TABLE membership (
        model_key VARCHAR NOT NULL,
        example_id INTEGER NOT NULL,
        is_member BOOLEAN NOT NULL
    );
    CREATE TABLE perturbations (
        signal_key VARCHAR PRIMARY KEY,
        model_key VARCHAR NOT NULL,
        name VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        eps DOUBLE,
        settings JSON,
        n_rows INTEGER,
        member_acc DOUBLE,
        nonmember_acc DOUBLE,
        seconds DOUBLE,
        created_at TIMESTAMPTZ
    );
    -- no primary key: it would double the file and slow ingest; uniqueness is checked at ingest
    CREATE TABLE signals (
        signal_key VARCHAR NOT NULL,
        model_key VARCHAR NOT NULL,
        example_id INTEGER NOT NULL,
        label INTEGER NOT NULL,
        is_member BOOLEAN NOT NULL,
        loss DOUBLE,
        confidence FLOAT,
        margin DOUBLE,
        entropy DOUBLE,
        mentropy DOUBLE,
        is_correct BOOLEAN,
        probs FLOAT[]
    );
    """,
    # 2: attacks, their per-sample scores and metrics (written by `robmia-db score`)
    """
    CREATE TABLE attacks (
        attack_key VARCHAR PRIMARY KEY,     -- hash of name, normalised source and resolved params
        name VARCHAR NOT NULL,
        title VARCHAR,
        paper VARCHAR,
        description VARCHAR,
        language VARCHAR,                   -- 'sql' or 'python'
        source_path VARCHAR,
        source VARCHAR,
        params JSON,
        needs JSON,
        created_at TIMESTAMPTZ
    );
    CREATE TABLE scores (
        attack_key VARCHAR NOT NULL,
        model_key VARCHAR NOT NULL,
        perturbation VARCHAR NOT NULL,
        example_id INTEGER NOT NULL,
        score DOUBLE
    );
    CREATE TABLE metrics (
        attack_key VARCHAR NOT NULL,
        model_key VARCHAR NOT NULL,
        perturbation VARCHAR NOT NULL,
        inputs_key VARCHAR NOT NULL,        -- hash of the signal keys the scores were computed from
        balanced_accuracy DOUBLE,
        auc DOUBLE,
        tpr_at_fpr_0 DOUBLE,
        tpr_at_fpr_1e3 DOUBLE,
        tpr_at_fpr_1e2 DOUBLE,
        advantage DOUBLE,
        threshold DOUBLE,
        n_members INTEGER,
        n_nonmembers INTEGER,
        tp_at_best BIGINT,
        fp_at_best BIGINT,
        auc_numerator2 HUGEINT,
        calibrated_accuracy DOUBLE,         -- balanced accuracy at a threshold chosen on reference models
        calibrated_threshold DOUBLE,
        n_reference_models INTEGER,
        seconds DOUBLE,
        created_at TIMESTAMPTZ
    );
    CREATE TABLE attack_skips (
        attack_key VARCHAR NOT NULL,
        model_key VARCHAR NOT NULL,
        perturbation VARCHAR,
        reason VARCHAR NOT NULL,
        created_at TIMESTAMPTZ
    );
    """,
    # 3: no table change; bumping the version makes older stores refresh their views (v_attacks,
    # v_models.package_versions) on the next open
    "SELECT 1;",
]


def create_v3_store(path) -> None:
    """An empty store exactly as the code at 134d271 created it (schema_version rows 1..3)."""
    con = duckdb.connect(str(path))
    try:
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ)"
        )
        for version, sql in enumerate(V3_MIGRATIONS, start=1):
            con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?, now())", [version])
    finally:
        con.close()
