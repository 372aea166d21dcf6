"""The house, enforced: the import contracts in pyproject.toml hold (import-linter), and the
checker does see an import that breaks one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    out = _lint()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def test_a_forbidden_import_is_reported(tmp_path):
    """The engine does import distributed: a contract forbidding it must be broken."""
    cfg = tmp_path / "contracts.ini"
    cfg.write_text("[importlinter]\nroot_package = dmice\ninclude_external_packages = True\n\n"
                   "[importlinter:contract:engine]\nname = engine without distributed\ntype = forbidden\n"
                   "source_modules = dmice.engine\nforbidden_modules = distributed\n")
    out = _lint(str(cfg))
    assert out.returncode != 0 and "engine without distributed BROKEN" in out.stdout
