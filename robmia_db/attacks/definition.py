"""Attacks layer: parsing and checking one attack definition (`.sql` with a TOML header, or `.py`).

A `.sql` attack's leading `-- ` comment block is TOML:

    -- title = "True-label confidence"
    -- paper = "Song, Shokri, Mittal. CCS 2019. https://arxiv.org/abs/1905.10291"
    -- needs = ["signal"]
    -- params = { temperature = 1.0 }
    -- description = "..."
    -- decision_threshold = 0.0      (optional: the attack's own rule, member iff score >= it)
    -- nonfinite = "error"           (optional: "error" refuses NULL/NaN/inf scores; "lowest" ranks them last)
    SELECT model_key, example_id, confidence / $temperature AS score FROM target

`needs` says which relations the attack reads and how often it is scored:
  "signal"                 -> `target`: one perturbation's rows (any kind); scored once per perturbation
  "benign", "adversarial", "verified" -> a view of that kind each; scored once per perturbation of the
                              last kind listed (e.g. once per PGD setting), labelled with its name
  "reference_models"       -> `reference`: the same perturbation on reference models, with is_member
The target relations never carry membership labels.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robmia_db.errors import AttackDefinitionError

KIND_NEEDS = ("benign", "adversarial", "verified")
KNOWN_NEEDS = ("signal", *KIND_NEEDS, "reference_models")
HEADER_KEYS = {"title", "paper", "needs", "params", "description", "decision_threshold", "nonfinite"}
# what an attack may declare about scores that are NULL, NaN or +-inf (default "error": refused, one line
# naming the attack, the model and how many); "lowest": NULL and NaN become -inf, below every other score,
# and +-inf keep their rank; metrics then count them (`n_nonfinite`)
NONFINITE_POLICIES = ("error", "lowest")
_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_STRINGS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_LINE_COMMENTS = re.compile(r"--[^\n]*")
_BLOCK_COMMENTS = re.compile(r"/\*.*?\*/", re.S)


@dataclass
class AttackDefinition:
    """One attack, ready to score: metadata, code, and resolved parameters."""

    name: str
    title: str
    paper: str
    needs: list[str]
    params: dict[str, Any]
    description: str
    language: str  # "sql" or "python"
    source: str
    path: str
    sql: str | None = None
    function: Callable[..., Any] | None = None
    origin: str = "builtin"
    extra: dict[str, Any] = field(default_factory=dict)
    # the attack's own decision rule: member iff score >= decision_threshold (None: the attack has none,
    # only the threshold-free metrics and the oracle / calibrated thresholds apply)
    decision_threshold: float | None = None
    nonfinite: str = "error"
    # the attack's own name; `name` adds the parameters that differ from the header's defaults, so variants
    # (`lira_offline[variance=per_example]`) are distinct attacks stored side by side
    base_name: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.base_name:
            self.base_name = self.name
        if not self.defaults:
            self.defaults = dict(self.params)

    def load_function(self) -> Callable[..., Any]:
        """Run a Python attack's module (trusted code: only when it is scored, never when listed)."""
        if self.function is None:
            self.function = _load_score_function(self.path, self.source)
        return self.function

    @property
    def signal_kind(self) -> str | None:
        """The kind whose perturbations the attack is scored on (None = every perturbation)."""
        kinds = [n for n in self.needs if n in KIND_NEEDS]
        return kinds[-1] if kinds else None

    @property
    def needs_reference(self) -> bool:
        return "reference_models" in self.needs

    def with_params(self, overrides: dict[str, Any]) -> AttackDefinition:
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            raise AttackDefinitionError(
                self.path, f"unknown parameter {unknown[0]!r} (declared: {sorted(self.params)})"
            )
        params = {**self.params, **overrides}
        changed = {k: v for k, v in sorted(params.items()) if v != self.defaults.get(k)}
        name = self.base_name
        if changed:
            name += "[" + ",".join(f"{k}={_param_text(v)}" for k, v in changed.items()) + "]"
        return AttackDefinition(**{**self.__dict__, "params": params, "name": name})

    @property
    def attack_key(self) -> str:
        """Content key: name, normalised source and resolved params. Editing the file re-scores it."""
        payload = json.dumps(
            {"name": self.name, "source": normalise_source(self.source), "params": self.params},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def normalise_source(source: str) -> str:
    lines = [line.rstrip() for line in source.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip() + "\n"


def _strip_for_params(sql: str) -> str:
    return _STRINGS.sub("''", _LINE_COMMENTS.sub("", _BLOCK_COMMENTS.sub("", sql)))


def used_params(sql: str) -> set[str]:
    return set(_PARAM.findall(_strip_for_params(sql)))


def _check_header(path: str, header: dict[str, Any], language: str) -> tuple[list[str], dict[str, Any]]:
    unknown = sorted(set(header) - HEADER_KEYS)
    if unknown:
        raise AttackDefinitionError(
            path, f"unknown header key {unknown[0]!r} (allowed: {', '.join(sorted(HEADER_KEYS))})"
        )
    if "title" not in header:
        raise AttackDefinitionError(path, "header has no `title`")
    needs = header.get("needs")
    if needs is None:
        raise AttackDefinitionError(path, 'header has no `needs` (e.g. needs = ["signal"])')
    if isinstance(needs, str):
        needs = [needs]
    if not isinstance(needs, list) or not needs or not all(isinstance(n, str) for n in needs):
        raise AttackDefinitionError(path, "`needs` must be a non-empty list of strings")
    bad = [n for n in needs if n not in KNOWN_NEEDS]
    if bad:
        raise AttackDefinitionError(
            path, f"`needs` has unknown entry {bad[0]!r} (known: {', '.join(KNOWN_NEEDS)})"
        )
    if "signal" in needs and any(n in KIND_NEEDS for n in needs):
        raise AttackDefinitionError(path, '`needs` mixes "signal" with specific kinds; use one or the other')
    params = header.get("params", {})
    if not isinstance(params, dict):
        raise AttackDefinitionError(path, "`params` must be a table of defaults")
    for key, value in params.items():
        if not isinstance(value, (int, float, str, bool)):
            raise AttackDefinitionError(path, f"param {key!r} must be a number, string or boolean")
    return needs, params


def _decision_threshold(path: str, header: dict[str, Any]) -> float | None:
    value = header.get("decision_threshold")
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value != value
        or abs(value) == float("inf")
    ):
        raise AttackDefinitionError(path, f"`decision_threshold` must be a finite number (got {value!r})")
    return float(value)


def _nonfinite(path: str, header: dict[str, Any]) -> str:
    value = header.get("nonfinite", "error")
    if value not in NONFINITE_POLICIES:
        raise AttackDefinitionError(
            path, f"`nonfinite` must be one of {', '.join(map(repr, NONFINITE_POLICIES))} (got {value!r})"
        )
    return value


def _read_source(path: Path, source: str | None) -> str:
    if source is not None:
        return source
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AttackDefinitionError(path, f"cannot read: {exc.strerror or exc}") from None


def parse_sql_attack(path: str | Path, origin: str = "user", source: str | None = None) -> AttackDefinition:
    """Parse a `.sql` attack from its file, or from `source` (a stored attack's text) named by `path`."""
    path = Path(path)
    source = _read_source(path, source)
    header_lines: list[str] = []
    body_lines: list[str] = []
    in_header = True
    for line in source.splitlines():
        stripped = line.strip()
        if in_header and (stripped.startswith("--") or (not stripped and header_lines == [])):
            if stripped.startswith("--"):
                text = stripped[2:]
                header_lines.append(text[1:] if text.startswith(" ") else text)
            continue
        in_header = False
        body_lines.append(line)
    try:
        header = tomllib.loads("\n".join(header_lines))
    except tomllib.TOMLDecodeError as exc:
        raise AttackDefinitionError(path, f"header is not valid TOML: {exc}") from None
    needs, params = _check_header(str(path), header, "sql")
    sql = "\n".join(body_lines).strip().rstrip(";").strip()
    if not sql:
        raise AttackDefinitionError(path, "has no SQL after its header")
    used = used_params(sql)
    undeclared = sorted(used - set(params))
    if undeclared:
        raise AttackDefinitionError(path, f"uses ${undeclared[0]} but declares no such param")
    unused = sorted(set(params) - used)
    if unused:
        raise AttackDefinitionError(path, f"declares param {unused[0]!r} but never uses ${unused[0]}")
    return AttackDefinition(
        name=path.stem, title=str(header["title"]), paper=str(header.get("paper", "")), needs=needs,
        params=params, description=str(header.get("description", "")).strip(), language="sql",
        source=source, path=str(path), sql=sql, origin=origin,
        decision_threshold=_decision_threshold(str(path), header), nonfinite=_nonfinite(str(path), header),
    )  # fmt: skip


def parse_python_attack(
    path: str | Path, origin: str = "user", source: str | None = None
) -> AttackDefinition:
    """A `.py` attack defines `ATTACK = {title, paper, needs, params, description}` and `score(ctx, params)`.

    `score` gets a read-only context (`ctx.sql(query)` over the same relations as SQL attacks) and returns
    a table (Arrow, pandas or dict of arrays) of exactly (model_key, example_id, score). The header is read
    statically (`ast`): listing or planning never runs the file; it runs only when it is scored.
    """
    path = Path(path)
    source = _read_source(path, source)
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise AttackDefinitionError(path, f"is not valid Python (line {exc.lineno}): {exc.msg}") from None
    header = None
    has_score = False
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "ATTACK" for t in node.targets
        ):
            try:
                header = ast.literal_eval(node.value)
            except ValueError:
                raise AttackDefinitionError(
                    path, "ATTACK must be a literal dict (it is read without running the file)"
                ) from None
        elif isinstance(node, ast.FunctionDef) and node.name == "score":
            has_score = True
    if not isinstance(header, dict):
        raise AttackDefinitionError(path, "defines no ATTACK = {...} header dict")
    if not has_score:
        raise AttackDefinitionError(path, "defines no score(ctx, params) function")
    needs, params = _check_header(str(path), header, "python")
    return AttackDefinition(
        name=path.stem, title=str(header["title"]), paper=str(header.get("paper", "")), needs=needs,
        params=params, description=str(header.get("description", "")).strip(), language="python",
        source=source, path=str(path), function=None, origin=origin,
        decision_threshold=_decision_threshold(str(path), header), nonfinite=_nonfinite(str(path), header),
    )  # fmt: skip


def _load_score_function(path: str, source: str) -> Callable[..., Any]:
    import types

    module = types.ModuleType(f"robmia_attack_{Path(path).stem}")
    module.__file__ = path
    try:
        exec(compile(source, path, "exec"), module.__dict__)  # trusted code, like a plugin (README)
    except Exception as exc:  # a user's file: report, don't crash the run
        raise AttackDefinitionError(path, f"fails to import: {type(exc).__name__}: {exc}") from None
    function = module.__dict__.get("score")
    if not callable(function):
        raise AttackDefinitionError(path, "defines no score(ctx, params) function")
    return function


def parse_attack(path: str | Path, origin: str = "user", source: str | None = None) -> AttackDefinition:
    path = Path(path)
    if path.suffix == ".sql":
        return parse_sql_attack(path, origin, source)
    if path.suffix == ".py":
        return parse_python_attack(path, origin, source)
    raise AttackDefinitionError(path, "is not an attack file (.sql or .py)")
