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
                   "source_modules = dmice.runtime.engine\nforbidden_modules = distributed\n")
    out = _lint(str(cfg))
    assert out.returncode != 0 and "engine without distributed BROKEN" in out.stdout


def _contract_sources() -> set[str]:
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return {m for c in cfg if "distributed" in c.get("forbidden_modules", ()) for m in c["source_modules"]}


def test_every_module_but_the_runtime_is_barred_from_distributed():
    """A new module is covered by a contract forbidding distributed, unless it is in the runtime."""
    listed = _contract_sources()
    pkg = ROOT / "dmice"
    missing = []
    for path in sorted(pkg.iterdir()):
        name = path.stem if path.suffix == ".py" else path.name if (path / "__init__.py").exists() else None
        if name is None or name in ("__init__", "runtime", "__main__"):
            continue
        if f"dmice.{name}" not in listed:
            missing.append(f"dmice.{name}")
    assert not missing, f"not covered by a contract forbidding distributed: {missing}"


def test_only_the_runtime_computes_on_the_cluster():
    """No module outside dmice/runtime calls the cluster's methods (compute, persist, submit,
    gather, scatter, who_has, scheduler_info, cancel) but on the runtime's own modules:
    collections are computed by the runtime's passes."""
    import ast

    calls = {"compute", "persist", "submit", "gather", "scatter", "who_has", "scheduler_info", "cancel"}
    runtime = {"_passes", "_cluster", "_engine"}  # how the modules of dmice.runtime are imported
    found = []
    for path in sorted((ROOT / "dmice").rglob("*.py")):
        if "runtime" in path.relative_to(ROOT / "dmice").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls \
                    and not (isinstance(node.func.value, ast.Name) and node.func.value.id in runtime):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.func.attr}()")
    assert not found, found


def test_in_memory_data_is_partitioned_in_one_place():
    """pandas frames become dask frames through dmice.runtime.passes.from_pandas only (one
    partition size, dtypes kept), not through dd.from_pandas elsewhere."""
    import ast

    found = []
    for path in sorted((ROOT / "dmice").rglob("*.py")):
        if path.relative_to(ROOT / "dmice").parts[0] == "runtime":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("from_pandas", "from_dict", "from_array") \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "dd":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def _cycles(graph) -> list[tuple[str, str]]:
    """Pairs of modules that import each other, directly or through others (lazy imports
    included; a package and its own modules excepted)."""
    out = []
    for a in sorted(graph.modules):
        for b in sorted(graph.find_modules_directly_imported_by(a)):
            if b == a or b.startswith(a + ".") or a.startswith(b + "."):
                continue
            if graph.chain_exists(importer=b, imported=a):
                out.append((a, b))
    return out


def test_no_import_cycles():
    import grimp

    assert _cycles(grimp.build_graph("dmice")) == []


def test_the_cycle_check_sees_a_cycle():
    import grimp

    g = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        g.add_module(name)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.c")
    g.add_import(importer="p.c", imported="p.a")
    assert ("p.a", "p.b") in _cycles(g)
