"""The import boundaries of pyproject.toml ([tool.importlinter]): services never import each other, the
kernel imports no service, no service imports the operator's programs (services/operator/), and HTTP
routers leave SQL to domain objects. import-linter must keep them on
the tree as it is and break them on a copy of the tree with one deliberate breach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}     # `services` is the copy under root, not the installed tree
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_tree(dst: Path) -> Path:
    shutil.copytree(ROOT / "services", dst / "services", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_tree_keeps_every_contract():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 kept, 0 broken" in out.stdout, out.stdout


BREACHES = [   # (module, the line added to a copy of it, the contract it breaks, the chain reported)
    ("purchase/api.py", "from services.quota import ledger", "services never import each other",
     "services.purchase.api -> services.quota.ledger"),
    ("kernel/topics.py", "import services.stamping.serial", "the kernel imports no service",
     "services.kernel.topics -> services.stamping.serial"),
    ("quota/api.py", "import asyncpg", "HTTP routers do not talk SQL", "services.quota.api -> asyncpg"),
    ("notification/service.py", "from services.operator import walkthrough",
     "no service imports the operator's programs", "services.notification.service -> services.operator.walkthrough"),
]


@pytest.mark.parametrize(("module", "line", "contract", "chain"), BREACHES, ids=[b[0] for b in BREACHES])
def test_a_deliberate_breach_breaks_its_contract(tmp_path, module, line, contract, chain):
    root = copy_tree(tmp_path)
    mod = root / "services" / module
    mod.write_text(mod.read_text() + f"\n{line}  # noqa: E402,F401 - the deliberate breach\n")
    out = lint_imports(root)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{contract}" in out.stdout and f"{contract}" in out.stdout.split("Broken contracts")[-1], out.stdout
    assert chain in out.stdout, out.stdout
