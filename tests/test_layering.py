"""The layers import downwards only (issue 14): engines know nothing of the trainer, SiD²ₐ or the composition root;
teacher families know nothing of the trainer; only entry points (commands, launchers, demos, studies) compose a run.
Every import counts, including the ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABOVE_ENGINES = ("sid_fast.trainer", "sid_fast.adversarial", "sid_fast.composition", "sid_fast.eval", "sid_fast.demo",
                 "sid_fast.commands", "sid_fast.shapes.real")
ABOVE_MODELS = ("sid_fast.trainer", "sid_fast.adversarial", "sid_fast.composition", "sid_fast.engine",
                "sid_fast.commands", "sid_fast.demo")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in sorted((ROOT / "sid_fast" / folder).glob("*.py")):
        bad = sorted(name for name in imported_modules(path) if name.startswith(forbidden))
        if bad:
            found[path.name] = bad
    return found


def test_engines_import_nothing_above_them():
    assert offending("engine", ABOVE_ENGINES) == {}


def test_teacher_families_import_no_trainer_or_engine():
    assert offending("models", ABOVE_MODELS) == {}


def test_only_entry_points_import_the_composition_root():
    users = [path.relative_to(ROOT).as_posix() for path in sorted((ROOT / "sid_fast").rglob("*.py"))
             if "sid_fast.composition" in imported_modules(path)]
    assert all(user.startswith(("sid_fast/commands/", "sid_fast/demo/")) for user in users), users
