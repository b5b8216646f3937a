CREATE TABLE experiments (
    name VARCHAR NOT NULL,
    description VARCHAR,
    spec_path VARCHAR,
    spec_text VARCHAR,
    updated_at TIMESTAMP WITH TIME ZONE,
    PRIMARY KEY (name)
);

CREATE TABLE models (
    model_key VARCHAR NOT NULL,
    model_name VARCHAR NOT NULL,
    experiment VARCHAR,
    origin VARCHAR NOT NULL,
    dataset VARCHAR,
    arch VARCHAR,
    width DOUBLE PRECISION,
    defense VARCHAR,
    eps DOUBLE PRECISION,
    seed INTEGER,
    model_index INTEGER,
    membership_scheme VARCHAR,
    n_members INTEGER,
    n_nonmembers INTEGER,
    n_classes INTEGER,
    input_shape INTEGER[],
    config JSON,
    status VARCHAR NOT NULL,
    error VARCHAR,
    checkpoint VARCHAR,
    dataset_checksum VARCHAR,
    git_commit VARCHAR,
    git_dirty BOOLEAN,
    package_versions JSON,
    host VARCHAR,
    device VARCHAR,
    started_at TIMESTAMP WITH TIME ZONE,
    finished_at TIMESTAMP WITH TIME ZONE,
    train_seconds DOUBLE PRECISION,
    train_history JSON,
    checkpoint_sha256 VARCHAR,
    spec_path VARCHAR,
    spec_text VARCHAR,
    PRIMARY KEY (model_key)
);

CREATE TABLE perturbations (
    signal_key VARCHAR NOT NULL,
    model_key VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    eps DOUBLE PRECISION,
    settings JSON,
    n_rows INTEGER,
    member_acc DOUBLE PRECISION,
    nonmember_acc DOUBLE PRECISION,
    seconds DOUBLE PRECISION,
    created_at TIMESTAMP WITH TIME ZONE,
    PRIMARY KEY (signal_key)
);

CREATE TABLE attacks (
    attack_key VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    title VARCHAR,
    paper VARCHAR,
    description VARCHAR,
    language VARCHAR,
    source_path VARCHAR,
    source VARCHAR,
    params JSON,
    needs JSON,
    created_at TIMESTAMP WITH TIME ZONE,
    base_name VARCHAR,
    origin VARCHAR,
    decision_threshold DOUBLE PRECISION,
    nonfinite VARCHAR,
    PRIMARY KEY (attack_key)
);

CREATE TABLE metrics (
    attack_key VARCHAR NOT NULL,
    model_key VARCHAR NOT NULL,
    perturbation VARCHAR NOT NULL,
    inputs_key VARCHAR NOT NULL,
    balanced_accuracy DOUBLE PRECISION,
    auc DOUBLE PRECISION,
    tpr_at_fpr_0 DOUBLE PRECISION,
    tpr_at_fpr_1e3 DOUBLE PRECISION,
    tpr_at_fpr_1e2 DOUBLE PRECISION,
    advantage DOUBLE PRECISION,
    threshold DOUBLE PRECISION,
    n_members INTEGER,
    n_nonmembers INTEGER,
    tp_at_best BIGINT,
    fp_at_best BIGINT,
    auc_numerator2 HugeInt,
    calibrated_accuracy DOUBLE PRECISION,
    calibrated_threshold DOUBLE PRECISION,
    n_reference_models INTEGER,
    seconds DOUBLE PRECISION,
    created_at TIMESTAMP WITH TIME ZONE,
    tpr_at_fpr_1e4 DOUBLE PRECISION,
    decision_accuracy DOUBLE PRECISION,
    decision_tpr DOUBLE PRECISION,
    decision_fpr DOUBLE PRECISION,
    n_nonfinite INTEGER,
    calibration_note VARCHAR
);

CREATE TABLE attack_skips (
    attack_key VARCHAR NOT NULL,
    model_key VARCHAR NOT NULL,
    perturbation VARCHAR,
    reason VARCHAR NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE
);

CREATE TABLE metric_intervals (
    attack_key VARCHAR NOT NULL,
    model_key VARCHAR NOT NULL,
    perturbation VARCHAR NOT NULL,
    inputs_key VARCHAR NOT NULL,
    n_resamples INTEGER NOT NULL,
    seed BIGINT NOT NULL,
    confidence DOUBLE PRECISION NOT NULL,
    balanced_accuracy_ci_low DOUBLE PRECISION,
    balanced_accuracy_ci_high DOUBLE PRECISION,
    auc_ci_low DOUBLE PRECISION,
    auc_ci_high DOUBLE PRECISION,
    tpr_at_fpr_0_ci_low DOUBLE PRECISION,
    tpr_at_fpr_0_ci_high DOUBLE PRECISION,
    tpr_at_fpr_1e3_ci_low DOUBLE PRECISION,
    tpr_at_fpr_1e3_ci_high DOUBLE PRECISION,
    tpr_at_fpr_1e2_ci_low DOUBLE PRECISION,
    tpr_at_fpr_1e2_ci_high DOUBLE PRECISION
);

CREATE TABLE fleet_metrics (
    attack_key VARCHAR NOT NULL,
    perturbation VARCHAR NOT NULL,
    recipe_key VARCHAR NOT NULL,
    model_key VARCHAR NOT NULL,
    n_targets INTEGER NOT NULL,
    balanced_accuracy DOUBLE PRECISION,
    auc DOUBLE PRECISION,
    tpr_at_fpr_0 DOUBLE PRECISION,
    tpr_at_fpr_1e4 DOUBLE PRECISION,
    tpr_at_fpr_1e3 DOUBLE PRECISION,
    tpr_at_fpr_1e2 DOUBLE PRECISION,
    advantage DOUBLE PRECISION,
    threshold DOUBLE PRECISION,
    n_members BIGINT,
    n_nonmembers BIGINT,
    decision_accuracy DOUBLE PRECISION,
    decision_tpr DOUBLE PRECISION,
    decision_fpr DOUBLE PRECISION,
    created_at TIMESTAMP WITH TIME ZONE
);
