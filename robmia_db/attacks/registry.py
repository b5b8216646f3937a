"""Attacks layer: one registry for built-in attacks, `--attacks DIR` / spec paths, and entry points.

Load order: built-ins, then user folders and files, then the `robmia_db.attacks` entry-point group. An attack
named like one already loaded from elsewhere (a user `confidence.sql`) is refused unless the caller asks to
replace it (`--replace`): a silent override would store other numbers under the paper attack's name. Nothing
is executed while loading: Python attacks' headers are read statically.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from robmia_db.attacks.definition import AttackDefinition, parse_attack
from robmia_db.errors import AttackDefinitionError

BUILTIN_DIR = Path(__file__).parent / "builtin"
ENTRY_POINT_GROUP = "robmia_db.attacks"


def _attack_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".sql", ".py") and not p.name.startswith("_"))


class AttackRegistry:
    def __init__(self, replace: bool = False) -> None:
        self.attacks: dict[str, AttackDefinition] = {}
        self.overridden: list[str] = []
        self.replace = replace

    def add(self, attack: AttackDefinition) -> None:
        previous = self.attacks.get(attack.name)
        if previous is not None and Path(previous.path).resolve() != Path(attack.path).resolve():
            if not self.replace:
                what = (
                    "the built-in attack"
                    if previous.origin == "builtin"
                    else f"the attack in {previous.path}"
                )
                raise AttackDefinitionError(
                    attack.path,
                    f"is named {attack.name!r} like {what}; rename it, or pass --replace to score it under that "
                    "name instead",
                )
            self.overridden.append(attack.name)
        self.attacks[attack.name] = attack

    def add_path(self, path: str | Path, origin: str = "user") -> list[AttackDefinition]:
        path = Path(path)
        if path.is_dir():
            found = [parse_attack(p, origin) for p in _attack_files(path)]
        elif path.exists():
            found = [parse_attack(path, origin)]
        else:
            raise AttackDefinitionError(path, "no such attack file or folder")
        for attack in found:
            self.add(attack)
        return found

    def get(self, name: str) -> AttackDefinition:
        if name not in self.attacks:
            raise AttackDefinitionError(
                None, f"unknown attack {name!r} (known: {', '.join(sorted(self.attacks))})"
            )
        return self.attacks[name]

    def __iter__(self):
        return iter(sorted(self.attacks.values(), key=lambda a: (a.origin != "builtin", a.name)))


def load_registry(
    paths: list[str | Path] | None = None, entry_points: bool = True, replace: bool = False
) -> AttackRegistry:
    registry = AttackRegistry(replace)
    registry.add_path(BUILTIN_DIR, origin="builtin")
    for path in paths or []:
        registry.add_path(path, origin="user")
    if entry_points:
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            target = entry.load()
            for item in target() if callable(target) else [target]:
                registry.add_path(Path(item), origin=f"plugin:{entry.name}")
    return registry
