"""`check` counts each dataset and applies the membership rule, so it refuses what `run` would refuse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from conftest import REPO, SpecWriter, clean_env
from sklearn.datasets import load_digits

from robmia_db.cli import main

N_DIGITS = len(load_digits().target)  # independent of our loader


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_check_refuses_more_members_than_the_data_holds_like_run(write_spec: SpecWriter, tmp_path: Path):
    spec = write_spec({"membership": {"n_members": 5000, "n_nonmembers": None}})
    checked = invoke("check", str(spec))
    assert checked.exit_code == 1
    expected = f"Error: {spec}: membership.n_members: 5000 leaves no non-members in the {N_DIGITS} examples"
    assert checked.stderr.strip() == expected
    # `run` refuses the same spec with the same line before training anything
    ran = subprocess.run(
        [sys.executable, "-m", "robmia_db", "run", str(spec), "--db", str(tmp_path / "s.duckdb")],
        cwd=REPO, capture_output=True, text=True, env=clean_env(), timeout=300,
    )  # fmt: skip
    assert ran.returncode == 1
    assert ran.stderr.strip() == expected
    assert not (tmp_path / "s.duckdb").exists()


def test_check_states_the_member_counts_it_checked(write_spec: SpecWriter):
    ok = write_spec({"membership": {"n_members": 400, "n_nonmembers": None}}, name="ok.toml")
    halves = write_spec(
        {
            "experiment": {"name": "halves"},
            "membership": {
                "scheme": "random_halves",
                "n_members": None,
                "n_nonmembers": None,
                "population": 1001,
            },
        },
        name="halves.toml",
    )
    result = invoke("check", str(ok), str(halves))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines == [
        f"{ok}: ok (2 models)",
        f"  data: digits ({N_DIGITS:,} train): 400 members / {N_DIGITS - 400:,} non-members per model",
        f"{halves}: ok (2 models)",
        f"  data: digits ({N_DIGITS:,} train): {1001 // 2} members / {1001 - 1001 // 2} non-members per model",
    ]


def test_check_reports_every_file_and_skips_data_on_request(write_spec: SpecWriter, tmp_path: Path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, x=rng.integers(0, 256, (30, 4, 4), dtype=np.uint8), y=np.arange(30) % 3,
             split=np.array([0] * 20 + [1] * 10))  # fmt: skip
    too_many = write_spec(
        {"data": {"dataset": "npz", "root": str(npz)}, "membership": {"n_members": 10, "n_nonmembers": 11}},
        name="a.toml",
    )
    # a dotted folder name: the error still carries its key
    no_files = write_spec(
        {"experiment": {"name": "b"}, "data": {"dataset": "yale", "root": str(tmp_path / "data.v2")}},
        name="b.toml",
    )
    result = invoke("check", str(too_many), str(no_files))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: {too_many}: membership.n_nonmembers: asked for 11 examples but only 10 exist",
        f"Error: {no_files}: data.dataset: {tmp_path / 'data.v2'}: does not exist; dataset 'yale' expects "
        "CroppedYale/yaleBNN/yaleBNN_P00A+AAAE+EE.pgm files (38 subjects, 2,414 images of 192x168), "
        "as a folder or a .tar/.tar.gz/.tar.xz archive",
    ]
    skipped = invoke("check", str(too_many), "--no-data")
    assert skipped.exit_code == 0, skipped.output
    assert skipped.stdout.splitlines() == [f"{too_many}: ok (2 models)", "  data: not checked (--no-data)"]


def test_check_counts_without_importing_torch(write_spec: SpecWriter):
    spec = write_spec()
    code = (
        "import sys; from robmia_db.cli import main\n"
        "try:\n"
        f"    main(['check', {str(spec)!r}])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "assert 'torch' not in sys.modules, 'check imported torch'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=clean_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "400" not in result.stdout and "200 members / 200 non-members per model" in result.stdout
