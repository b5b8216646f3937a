"""A `run` with nothing to train does not need the run lock, so it succeeds while another run holds it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from conftest import REPO, TrainedStore, clean_env, merged, toml_dumps

from robmia_db.cli import main
from robmia_db.store.query import run_query

HOLD_LOCK = """
import sys, time
from robmia_db.store.connection import run_lock
with run_lock(sys.argv[1], command="robmia-db run other.toml"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_run_with_nothing_to_do_succeeds_while_another_run_holds_the_lock(
    trained_store: TrainedStore, tmp_path: Path
):
    db = trained_store.copy_to(tmp_path / "store")
    renamed = tmp_path / "renamed.toml"
    renamed.write_text(toml_dumps(merged(trained_store.spec, {"experiment": {"name": "renamed"}})))
    more = tmp_path / "more.toml"
    more.write_text(toml_dumps(merged(trained_store.spec, {"training": {"seeds": [0, 1]}})))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(db)],
        cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        runner = CliRunner()
        result = runner.invoke(main, ["run", str(renamed), "--db", str(db)])
        assert result.exit_code == 0, result.output
        plan = " ".join(result.stderr.split())  # the console may wrap the line
        assert plan.startswith("2 model(s): 0 to train") and "0 to add signals to, 2 already stored" in plan
        # its metadata still lands: renaming never retrains, and needs no lock
        names = run_query(db, "SELECT model_name FROM v_models ORDER BY 1").column("model_name").to_pylist()
        assert names == ["renamed/natural-s0", "renamed/pgd_at-eps0.1-s0"]
        # a run with work to do is refused, naming the holder, and trains nothing
        result = runner.invoke(main, ["run", str(more), "--db", str(db)])
        assert result.exit_code == 1
        (line,) = result.stderr.strip().splitlines()[-1:]
        assert line.startswith(f"Error: {db} is being written by a run by process {holder.pid} on ")
        assert "(robmia-db run other.toml); wait for it to finish or stop it" in result.stderr
        assert run_query(db, "SELECT count(*) AS n FROM v_models").column("n").to_pylist() == [2]
    finally:
        holder.kill()
        holder.wait(timeout=30)
