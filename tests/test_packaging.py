"""Packaging: the hand-written package list covers every package folder, and the console script runs."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "qlx").rglob("__init__.py")}
    found |= {".".join(("qlx", *p.parent.relative_to(ROOT).parts)) for p in (ROOT / "kernels").rglob("__init__.py")}
    assert found == listed


def test_console_script_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "qlx.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "convert", "synth", "serve", "train", "plot"):
        assert command in out.stdout


def _imported_modules(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_layer_below_train_imports_train():
    """DESIGN.md: nothing in qlx/rollout or below imports qlx/train (what serving and training share lives below)."""
    below = ("models", "rollout", "rl", "data", "merge")
    upward = [
        f"{path.relative_to(ROOT)} imports {name}"
        for folder in below
        for path in sorted((ROOT / "qlx" / folder).rglob("*.py"))
        for name in _imported_modules(path)
        if name == "qlx.train" or name.startswith("qlx.train.")
    ]
    assert upward == []
