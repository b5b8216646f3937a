"""`score`'s progress: the reporter hears every scored batch (nested calibration runs not counted), and the CLI
shows it as one live stderr line on a terminal only, leaving stdout's one line per attack unchanged."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from conftest import clean_env
from test_reference_attacks import make_fleet

from robmia_db.attacks.scoring import score_attacks


class Recording:
    def __init__(self):
        self.events = []

    def attack_started(self, attack, n_units):
        self.events.append(("started", attack.name, n_units))

    def units_scored(self, attack, done, total):
        self.events.append(("scored", attack.name, done, total))

    def attack_finished(self, outcome):
        self.events.append(("finished", outcome.attack.name, outcome.scored))


def test_the_reporter_hears_each_target_once_and_never_a_calibration_run(tmp_path):
    fleet = make_fleet(tmp_path, seed=4, n_models=5)
    reporter = Recording()
    score_attacks(
        fleet.db, ["lira_online", "confidence"], reporter=reporter, resamples=0, calibration_models=2
    )
    by_attack = {}
    for event in reporter.events:
        by_attack.setdefault(event[1], []).append(event)
    for name, events in by_attack.items():
        (_, _, n_units), *scored, (_, _, n_scored) = events
        assert events[0][0] == "started" and events[-1][0] == "finished"
        done = [e[2] for e in scored]
        assert all(e[0] == "scored" and e[3] == n_units for e in scored)
        assert done == sorted(done) and done[-1] == n_units == n_scored, (name, done)
    # a reference attack runs one target per sandbox: one step per (model, perturbation), K = 2 runs unseen
    assert len(by_attack["lira_online"]) == 2 + by_attack["lira_online"][0][2]
    # a SQL attack scores all models of one perturbation in one batch: 3 steps for 5 models x 3 perturbations
    assert by_attack["confidence"][0][2] == 15 and len(by_attack["confidence"]) == 2 + 3


def _with_stderr_on_a_terminal(command: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    """Run `command` with stderr on a pseudo-terminal (stdout piped): its result and what the terminal got."""
    main, terminal = pty.openpty()
    shown = b""
    try:
        result = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=terminal, env=clean_env(), timeout=300, text=True
        )
        os.close(terminal)
        terminal = None
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the terminal's other end is closed: everything was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main)
        if terminal is not None:
            os.close(terminal)
    return result, shown.decode()


FAILING_ON_THE_THIRD_TARGET = """ATTACK = {"title": "fails on its third target", "needs": ["signal", "reference_models"]}
CALLS = []


def score(ctx, params):
    CALLS.append(1)
    if len(CALLS) == 3:
        raise ValueError("failing on purpose")
    return ctx.sql("SELECT model_key, example_id, confidence AS score FROM target")
"""


def test_the_cli_shows_progress_on_a_terminal_only(tmp_path):
    fleet = make_fleet(tmp_path, seed=5, n_models=4)
    command = [sys.executable, "-m", "robmia_db", "score", "--db", str(fleet.db), "--attack", "lira_online",
               "--resamples", "0", "--calibration-models", "0"]  # fmt: skip
    result, live = _with_stderr_on_a_terminal(command)
    assert result.returncode == 0, live
    assert "\rlira_online: 1/12 scored (" in live and "\rlira_online: 12/12 scored (" in live, live
    assert live.endswith("\r\x1b[K")  # erased before the attack's own line
    assert result.stdout.splitlines()[0].startswith("lira_online: 12 scored, 0 cached (")
    assert "\r" not in result.stdout
    piped = subprocess.run(
        command + ["--force"], capture_output=True, env=clean_env(), timeout=300, text=True
    )
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr  # not a terminal: no live line


def test_an_error_after_some_progress_starts_on_a_clean_terminal_line(tmp_path):
    fleet = make_fleet(tmp_path, seed=6, n_models=4)
    attack = tmp_path / "third.py"
    attack.write_text(FAILING_ON_THE_THIRD_TARGET)
    command = [sys.executable, "-m", "robmia_db", "score", "--db", str(fleet.db), "--attack", str(attack),
               "--resamples", "0", "--calibration-models", "0"]  # fmt: skip
    result, live = _with_stderr_on_a_terminal(command)
    assert result.returncode == 1, live
    assert "\rthird: 2/12 scored (" in live and "3/12" not in live, live
    progress, error = live.rsplit("\r\x1b[K", 1)  # the live line erased, then the error
    assert error.startswith("Error: ") and "failing on purpose" in error and "Traceback" not in error, live
    assert error.count("\n") == 1  # one line (the terminal turns \n into \r\n)
