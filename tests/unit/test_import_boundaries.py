"""The import boundaries of pyproject.toml ([tool.importlinter]): services never import each other, the
kernel imports no service, and HTTP routers leave SQL to domain objects. import-linter must keep them on
the tree as it is and break them on a copy of the tree with one deliberate breach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    assert "3 kept, 0 broken" in out.stdout, out.stdout


def test_a_service_importing_another_breaks_the_independence_contract(tmp_path):
    root = copy_tree(tmp_path)
    api = root / "services" / "purchase" / "api.py"
    api.write_text(api.read_text() + "\nfrom services.quota import ledger  # noqa: E402,F401 - the deliberate breach\n")
    out = lint_imports(root)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "services never import each other" in out.stdout and "BROKEN" in out.stdout, out.stdout
    assert "services.purchase.api -> services.quota.ledger" in out.stdout, out.stdout


def test_the_kernel_importing_a_service_breaks_the_layering_contract(tmp_path):
    root = copy_tree(tmp_path)
    mod = root / "services" / "kernel" / "topics.py"
    mod.write_text(mod.read_text() + "\nimport services.stamping.serial  # noqa: E402,F401 - the deliberate breach\n")
    out = lint_imports(root)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the kernel imports no service" in out.stdout and "BROKEN" in out.stdout, out.stdout


def test_a_router_importing_asyncpg_breaks_the_thin_router_contract(tmp_path):
    root = copy_tree(tmp_path)
    mod = root / "services" / "quota" / "api.py"
    mod.write_text(mod.read_text() + "\nimport asyncpg  # noqa: E402,F401 - the deliberate breach\n")
    out = lint_imports(root)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "HTTP routers do not talk SQL" in out.stdout and "BROKEN" in out.stdout, out.stdout
    assert "services.quota.api -> asyncpg" in out.stdout, out.stdout
