"""Spec validation errors as the user sees them: `robmia-db check FILE` prints one exact line per error.

A table of (bad TOML -> expected `Error: FILE: key: message` lines), run through the real CLI in-process;
plus missing files, folders, several bad files at once (nothing trained, no store created) and --debug.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import robmia

from robmia_db.cli import main

EXPERIMENT = '[experiment]\nname = "x"\n'
# [data] first, so that cases appending bare keys still add them to [experiment]
HEAD = '[data]\ndataset = "digits"\n' + EXPERIMENT
DATA = EXPERIMENT + "[data]\ndataset = 'digits'\n"

# (id, TOML text, expected messages after "Error: FILE: "): a str is matched exactly, an re.Pattern fully
# (used where the message lists a registry that other modules extend).
CASES: list[tuple[str, str, list[str | re.Pattern]]] = [
    (
        "toml-syntax",
        EXPERIMENT + "[data\ndataset = 'digits'\n",
        [re.compile(r"invalid TOML: .+ \(at line 3, column \d+\)")],
    ),
    ("unknown-top-level", "bogus = 1\n" + HEAD, ["bogus: unknown key"]),
    ("unknown-experiment", HEAD + "colour = 'red'\n", ["experiment.colour: unknown key"]),
    ("unknown-data", DATA + "folder = 'a'\n", ["data.folder: unknown key"]),
    (
        "missing-data",
        EXPERIMENT,
        [
            re.compile(
                r'data\.dataset: required: name the dataset, e\.g\. \[data\] dataset = "digits" \(known: .*\)'
            )
        ],
    ),
    (
        "missing-dataset",
        EXPERIMENT + "[data]\nroot = 'a'\n",
        [
            re.compile(
                r'data\.dataset: required: name the dataset, e\.g\. \[data\] dataset = "digits" \(known: .*\)'
            )
        ],
    ),
    ("unknown-membership", HEAD + "[membership]\nnmembers = 3\n", ["membership.nmembers: unknown key"]),
    ("unknown-model", HEAD + "[model]\ndepth = 3\n", ["model.depth: unknown key"]),
    ("unknown-training", HEAD + "[training]\nepoch = 3\n", ["training.epoch: unknown key"]),
    (
        "unknown-optimizer",
        HEAD + "[training.optimizer]\nbeta = 0.9\n",
        ["training.optimizer.beta: unknown key"],
    ),
    (
        "unknown-lr-schedule",
        HEAD + "[training.lr_schedule]\nwarmup = 2\n",
        ["training.lr_schedule.warmup: unknown key"],
    ),
    ("unknown-pgd-at", HEAD + "[defense.pgd_at]\nstepz = 2\n", ["defense.pgd_at.stepz: unknown key"]),
    ("unknown-natural", HEAD + "[defense.natural]\nfoo = 1\n", ["defense.natural.foo: unknown key"]),
    (
        "unknown-signal-key",
        HEAD + "[[signals]]\nkind = 'benign'\n[[signals]]\nkind = 'adversarial'\nstep = 3\n",
        ["signals[1].step: unknown key"],
    ),
    ("unknown-attacks", HEAD + "[attacks]\nname = ['loss']\n", ["attacks.name: unknown key"]),
    ("unknown-runtime", HEAD + "[runtime]\ngpu = true\n", ["runtime.gpu: unknown key"]),
    ("missing-experiment", "[data]\ndataset = 'digits'\n", ["experiment: required key is missing"]),
    (
        "experiment-not-table",
        "experiment = 'x'\n[data]\ndataset = 'digits'\n",
        ["experiment: must be a table (got 'x')"],
    ),
    (
        "bad-experiment-name",
        "[experiment]\nname = 'has space'\n[data]\ndataset = 'digits'\n",
        ["experiment.name: must be a name of letters, digits, '_', '.', '-' (got 'has space')"],
    ),
    ("negative-eps", HEAD + "[training]\neps = -0.03\n", ["training.eps: must be > 0 (got -0.03)"]),
    ("eps-above-one", HEAD + "[training]\neps = [0.1, 2.0]\n", ["training.eps[1]: must be <= 1 (got 2)"]),
    ("eps-string", HEAD + "[training]\neps = 'auto'\n", ["training.eps: must be a number (got 'auto')"]),
    (
        "epochs-string",
        HEAD + "[training]\nepochs = 'ten'\n",
        ["training.epochs: must be an integer (got 'ten')"],
    ),
    (
        "epochs-fraction",
        HEAD + "[training]\nepochs = 2.5\n",
        ["training.epochs: must be an integer (got 2.5)"],
    ),
    ("batch-size-zero", HEAD + "[training]\nbatch_size = 0\n", ["training.batch_size: must be > 0 (got 0)"]),
    ("negative-seed", HEAD + "[training]\nseeds = [-1]\n", ["training.seeds[0]: must be >= 0 (got -1)"]),
    ("lr-zero", HEAD + "[training.optimizer]\nlr = 0\n", ["training.optimizer.lr: must be > 0 (got 0)"]),
    (
        "unknown-optimizer-name",
        HEAD + "[training.optimizer]\nname = 'rmsprop'\n",
        ["training.optimizer.name: must be one of 'adam' or 'sgd' (got 'rmsprop')"],
    ),
    (
        "gamma-above-one",
        HEAD + "[training.lr_schedule]\ngamma = 2\n",
        ["training.lr_schedule.gamma: must be <= 1 (got 2)"],
    ),
    (
        "milestone-beyond-epochs",
        HEAD + "[training]\nepochs = 5\n[training.lr_schedule]\nname = 'multistep'\nmilestones = [3, 9]\n",
        ["training.lr_schedule.milestones[1]: must be <= training.epochs (5) (got 9)"],
    ),
    ("no-defenses", HEAD + "[training]\ndefenses = []\n", ["training.defenses: must not be empty"]),
    (
        "unknown-defense",
        HEAD + "[training]\ndefenses = ['natural', 'bogus_defense']\n",
        [re.compile(r"training\.defenses: unknown defense 'bogus_defense' \(known: .*natural, pgd_at.*\)")],
    ),
    (
        "defense-twice",
        HEAD + "[training]\ndefenses = ['natural', 'natural']\n",
        ["training.defenses: lists a defense twice"],
    ),
    (
        "unknown-defense-section",
        HEAD + "[defense.bogus_defense]\nbeta = 6\n",
        [re.compile(r"defense\.bogus_defense: unknown defense \(known: .*natural, pgd_at.*\)")],
    ),
    (
        "defense-param-type",
        HEAD + "[defense.pgd_at]\nsteps = 'ten'\n",
        ["defense.pgd_at.steps: must be an integer (got 'ten')"],
    ),
    (
        "defense-steps-zero",
        HEAD + "[defense.pgd_at]\nsteps = 0\n",
        ["defense.pgd_at.steps: must be > 0 (got 0)"],
    ),
    (
        "defense-negative-ramp",
        HEAD + "[defense.pgd_at]\neps_ramp_epochs = -1\n",
        ["defense.pgd_at.eps_ramp_epochs: must be >= 0 (got -1)"],
    ),
    (
        "unknown-dataset",
        EXPERIMENT + "[data]\ndataset = 'imagenet'\n",
        [re.compile(r"data\.dataset: unknown dataset 'imagenet' \(known: .*digits.*\)")],
    ),
    ("n-train-zero", DATA + "n_train = 0\n", ["data.n_train: must be > 0 (got 0)"]),
    ("negative-split-seed", DATA + "split_seed = -1\n", ["data.split_seed: must be >= 0 (got -1)"]),
    (
        "random-halves-with-n-members",
        HEAD + "[membership]\nscheme = 'random_halves'\nn_members = 100\n",
        ["membership.n_members: random_halves takes population, not n_members/n_nonmembers"],
    ),
    (
        "n-models-without-random-halves",
        HEAD + "[membership]\nn_models = 3\n",
        ["membership.n_models: only random_halves trains a population of models"],
    ),
    (
        "unknown-arch",
        HEAD + "[model]\narch = 'resnet50'\n",
        [
            "model.arch: must be one of 'mlp', 'cnn', 'yale_vgg', 'fmnist_vgg' or 'wide_resnet' (got 'resnet50')"
        ],
    ),
    ("negative-width", HEAD + "[model]\nwidth = [1.0, -2]\n", ["model.width[1]: must be > 0 (got -2)"]),
    (
        "unknown-signal-kind",
        HEAD + "[[signals]]\nkind = 'blackbox'\n",
        ["signals[0]: kind must be one of 'benign', 'adversarial', 'verified' (got 'blackbox')"],
    ),
    (
        "signal-without-kind",
        HEAD + "[[signals]]\nname = 'x'\n",
        ["signals[0]: needs a `kind` (benign, adversarial or verified)"],
    ),
    (
        "duplicate-signal-names",
        HEAD + "[[signals]]\nkind = 'benign'\n[[signals]]\nkind = 'adversarial'\nname = 'benign'\n",
        ["signals: name 'benign' is used twice; give each perturbation its own name"],
    ),
    (
        "signal-negative-eps",
        HEAD + "[[signals]]\nkind = 'adversarial'\neps = -1\n",
        ["signals[0].eps: must be > 0 (got -1)"],
    ),
    (
        "signal-eps-string",
        HEAD + "[[signals]]\nkind = 'adversarial'\neps = 'big'\n",
        ["signals[0].eps: must be a number or \"auto\" (got 'big')"],
    ),
    (
        "signal-steps-zero",
        HEAD + "[[signals]]\nkind = 'adversarial'\nsteps = 0\n",
        ["signals[0].steps: must be > 0 (got 0)"],
    ),
    (
        "signal-bad-name",
        HEAD + "[[signals]]\nkind = 'benign'\nname = 'a b'\n",
        ["signals[0].name: must be a name of letters, digits, '_', '.', '-' (got 'a b')"],
    ),
    (
        "verified-unknown-method",
        HEAD + "[[signals]]\nkind = 'verified'\nmethod = 'magic'\n",
        ["signals[0].method: must be one of 'ibp', 'crown_ibp', 'crown', 'dual' or 'zonotope' (got 'magic')"],
    ),
    (
        "unknown-device",
        HEAD + "[runtime]\ndevice = 'tpu'\n",
        ["runtime.device: must be one of 'auto', 'cpu' or 'cuda' (got 'tpu')"],
    ),
    ("threads-zero", HEAD + "[runtime]\nthreads = 0\n", ["runtime.threads: must be > 0 (got 0)"]),
    (
        "eval-batch-size-zero",
        HEAD + "[runtime]\neval_batch_size = 0\n",
        ["runtime.eval_batch_size: must be > 0 (got 0)"],
    ),
    (
        "several-errors-in-one-file",
        HEAD + "colour = 1\n[training]\neps = -0.03\nepochs = 0\n",
        [
            "experiment.colour: unknown key",
            "training.eps: must be > 0 (got -0.03)",
            "training.epochs: must be > 0 (got 0)",
        ],
    ),
]


def check(*paths: Path | str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["check", *map(str, paths)])
    return result.exit_code, result.stdout, result.stderr


def assert_error_lines(stderr: str, path: Path | str, expected: list[str | re.Pattern]) -> None:
    lines = stderr.splitlines()
    assert len(lines) == len(expected), stderr
    for line, want in zip(lines, expected, strict=True):
        prefix = f"Error: {path}: "
        assert line.startswith(prefix), line
        message = line[len(prefix) :]
        if isinstance(want, re.Pattern):
            assert want.fullmatch(message), message
        else:
            assert message == want


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_prints_one_exact_line_per_error(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    code, stdout, stderr = check(path)
    assert code == 1
    assert stdout == ""
    assert "Traceback" not in stderr
    assert_error_lines(stderr, path, expected)


def test_toml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(EXPERIMENT + "[data\ndataset = 'digits'\n", encoding="utf-8")
    _, _, stderr = check(path)
    assert "line" in stderr and "column" in stderr


def test_table_covers_enough_cases():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


def test_negative_pgd_at_step_size_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(HEAD + "[defense.pgd_at]\nstep_size = -1.0\n", encoding="utf-8")
    code, _, stderr = check(path)
    assert code == 1
    assert_error_lines(stderr, path, ["defense.pgd_at.step_size: must be > 0 (got -1)"])


def test_missing_file_and_folder(tmp_path):
    missing = tmp_path / "nothere.toml"
    code, stdout, stderr = check(missing, tmp_path)
    assert code == 1
    assert stderr.splitlines() == [
        f"Error: {missing}: file not found",
        f"Error: {tmp_path}: is a folder, not a spec file",
    ]


def test_good_file_passes_and_bad_file_beside_it_still_fails(write_spec, tmp_path):
    good = write_spec()
    bad = tmp_path / "bad.toml"
    bad.write_text(HEAD + "[training]\nepochs = 0\n", encoding="utf-8")
    code, stdout, stderr = check(good)
    assert code == 0 and stderr == ""
    assert (
        stdout
        == f"{good}: ok (2 models)\n  data: digits (1,797 train): 200 members / 200 non-members per model\n"
    )
    code, stdout, stderr = check(good, bad)
    assert code == 1
    assert stderr.splitlines() == [f"Error: {bad}: training.epochs: must be > 0 (got 0)"]


def test_two_bad_files_report_all_errors_and_train_nothing(tmp_path):
    first = tmp_path / "first.toml"
    first.write_text(HEAD + "colour = 1\n[training]\neps = -0.03\n", encoding="utf-8")
    second = tmp_path / "second.toml"
    second.write_text(HEAD + "[[signals]]\nkind = 'blackbox'\n", encoding="utf-8")
    store = tmp_path / "out" / "store.duckdb"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["run", str(first), str(second), "--db", str(store)])
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"Error: {first}: experiment.colour: unknown key",
        f"Error: {first}: training.eps: must be > 0 (got -0.03)",
        f"Error: {second}: signals[0]: kind must be one of 'benign', 'adversarial', 'verified' (got 'blackbox')",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, lock or checkpoint folder


def test_same_experiment_name_in_two_files_is_refused(write_spec):
    first = write_spec(name="a.toml")
    second = write_spec(name="b.toml")
    code, _, stderr = check(first, second)
    assert code == 1
    assert stderr.splitlines() == [f"Error: {second}: experiment.name: 'tiny' is also the name in {first}"]


def test_debug_shows_a_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(HEAD + "[training]\nepochs = 0\n", encoding="utf-8")
    plain = robmia("check", str(path))
    assert plain.returncode == 1
    assert plain.stderr == f"Error: {path}: training.epochs: must be > 0 (got 0)\n"
    debug = robmia("--debug", "check", str(path))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "SpecErrors" in debug.stderr and "training.epochs: must be > 0 (got 0)" in debug.stderr


PREFLIGHT_CASES = {
    "too-many-members": (
        {"membership": {"n_members": 5000}},
        "membership.n_members: 5000 leaves no non-members in the 1797 examples",
    ),
    "too-many-nonmembers": (
        {"membership": {"n_nonmembers": 1700}},
        "membership.n_nonmembers: asked for 1700 examples but only 1597 exist",
    ),
    "option-the-arch-lacks": ({"model": {"arch": "cnn"}}, "model.options: cnn takes no option 'hidden'"),
}


@pytest.mark.parametrize(("overrides", "message"), PREFLIGHT_CASES.values(), ids=PREFLIGHT_CASES.keys())
def test_run_checks_data_and_architecture_before_any_work(write_spec, tmp_path, overrides, message):
    spec = write_spec(overrides)
    store = tmp_path / "out" / "store.duckdb"
    result = CliRunner().invoke(main, ["run", str(spec), "--db", str(store)])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: {spec}: ") and line.endswith(message) and "Traceback" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("overrides", "message"), PREFLIGHT_CASES.values(), ids=PREFLIGHT_CASES.keys())
def test_preflight_errors_name_their_key_once(write_spec, tmp_path, overrides, message):
    spec = write_spec(overrides)
    result = CliRunner().invoke(main, ["run", str(spec), "--db", str(tmp_path / "store.duckdb")])
    assert result.stderr.splitlines() == [f"Error: {spec}: {message}"]
