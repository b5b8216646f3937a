"""CLI layer: the click group, global options and the one place errors become `Error: ...` + exit 1.

Command modules import only click and this module at import time; everything heavy (duckdb, torch,
numpy) is imported inside each command, so `robmia-db --help` and `robmia-db sql` never load torch.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

DEFAULT_DB = "robmia.duckdb"
TIMEOUT_HELP = (
    "Seconds to wait for a store another process holds (default 15 to read, 60 to write); a run never "
    "drops a finished model: it waits for the holder, naming it."
)
DB_ENV = "ROBMIA_DB"


class CliState:
    def __init__(self, debug: bool, db: str | None, timeout: float | None = None):
        self.debug = debug
        self._db = db
        self.timeout = timeout

    @property
    def db_path(self) -> Path:
        return Path(self._db or os.environ.get(DB_ENV) or DEFAULT_DB)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Example: robmia-db run specs/quickstart.toml && robmia-db score && robmia-db report",
)
@click.option("--db", "db", metavar="PATH", help=f"Store file (default ./{DEFAULT_DB}, or ${DB_ENV}).")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("--timeout", type=click.FloatRange(0), metavar="SECONDS", help=TIMEOUT_HELP)
@click.version_option(package_name="robmia-db", prog_name="robmia-db")
@click.pass_context
def main(ctx: click.Context, db: str | None, debug: bool, timeout: float | None) -> None:
    """robmia-db: a declarative experiment database for membership inference against robust models."""
    ctx.obj = CliState(debug=debug, db=db, timeout=timeout)


def db_option(func):
    """Per-command `--db` and `--timeout`, so they work after the command name too (`robmia-db sql --db x`)."""

    @click.option("--db", "command_db", metavar="PATH", help="Store file (overrides the global --db).")
    @click.option(
        "--timeout", "command_timeout", type=click.FloatRange(0), metavar="SECONDS", help=TIMEOUT_HELP
    )
    @functools.wraps(func)
    def wrapper(*args, command_db: str | None = None, command_timeout: float | None = None, **kwargs):
        state = click.get_current_context().find_object(CliState)
        if command_db and state is not None:
            state._db = command_db
        if command_timeout is not None and state is not None:
            state.timeout = command_timeout
        from robmia_db.store.connection import set_default_timeout

        # set on every call (None resets it): in-process callers (tests, notebooks) never inherit it
        set_default_timeout(state.timeout if state is not None else None)
        return func(*args, **kwargs)

    return wrapper


def get_state() -> CliState:
    state = click.get_current_context().find_object(CliState)
    return state if state is not None else CliState(debug=False, db=None)


def safe(text: object) -> str:
    """Text with terminal control characters (escape sequences) shown as `\\x1b`, never executed."""
    from robmia_db.errors import safe_text

    return safe_text(text)


def _os_error_text(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or type(exc).__name__}{where}"


def handle_errors(func):
    """Turn library errors into one line on stderr and exit 1; `--debug` shows the traceback.

    Operating-system errors (disk full, read-only folder) and DuckDB's own errors become one line too:
    they are about the user's machine or files, not bugs, and nothing is lost (writes are transactions).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from robmia_db.errors import RobmiaError

        try:
            return func(*args, **kwargs)
        except (RobmiaError, OSError) as exc:
            if get_state().debug:
                raise
            text = _os_error_text(exc) if isinstance(exc, OSError) else str(exc)
            for line in text.splitlines() or [type(exc).__name__]:
                click.echo(f"Error: {safe(line)}", err=True)
            if getattr(exc, "abandoned_thread", False):
                # a stopped attack's query still runs in its daemon thread: interpreter shutdown could wait
                # on its DuckDB connection, so leave at once (the store was never touched by it)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            sys.exit(1)
        except Exception as exc:
            if get_state().debug or "duckdb" not in type(exc).__module__:
                raise
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            click.echo(f"Error: store: {safe(first)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            if get_state().debug:
                raise
            click.echo("Error: interrupted; finished models are stored, rerun to resume", err=True)
            sys.exit(1)

    return wrapper
