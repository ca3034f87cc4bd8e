"""The code's shape, checked: what import-linter cannot see (the arrows themselves are its contracts in
setup.cfg, run by ``lint-imports`` in CI and by :func:`test_import_contracts` here).

- lipsdp's own modules are imported at module top, so the path from a model file to a certificate can be
  read without running it; only optional or heavy dependencies load inside functions (``lipsdp.nn`` is
  torch, and ``lipsdp/__init__.py`` keeps ``import lipsdp`` light on purpose).
- No module imports another module's private (``_name``) objects: shared machinery is public where it lives.
- Modules stay under about 400 lines unless they are one algorithm; functions in the stage modules stay
  under about 60 lines of code (docstrings excluded: they hold the math).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lipsdp"

#: Imports of lipsdp modules that may stay inside functions: each needs torch at import time.
LAZY_OK = {"lipsdp.nn"}
#: Modules whose function-level imports are the point (``import lipsdp`` must not load the stages).
LAZY_MODULES = {"lipsdp/__init__.py"}
#: Modules over 400 lines that are one algorithm each.
ONE_ALGORITHM = {
    "lipsdp/exact.py",                  # exact rational LDL^T certificate of the LMI
    "lipsdp/solvers/completion_.py",    # the completion interior-point method
    "lipsdp/solvers/firstorder_.py",    # L-BFGS on the exact rho(T)
}
#: The stage modules, in data-flow order, whose functions stay short.
STAGES = ("pipeline", "reductions", "lifting", "lmi", "solve", "verification", "verify", "certificate",
          "wellposed", "network")


def _sources():
    files = []
    paths = sorted(Path(folder, name) for folder, _, names in os.walk(PACKAGE, followlinks=True)  # the links
                   for name in names if name.endswith(".py"))                                       # to constraints/, solvers/
    for path in paths:
        rel = path.relative_to(REPO).as_posix()
        files.append((rel, ast.parse(path.read_text(), filename=rel)))
    assert any(rel.startswith("lipsdp/solvers/") for rel, _ in files), "the solvers link is not followed"
    assert any(rel.startswith("lipsdp/constraints/") for rel, _ in files), "the constraints link is not followed"
    return files


SOURCES = _sources()


def _module_names(node) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return []


def _code_lines(fn) -> int:
    body = fn.body
    first = body[1] if len(body) > 1 and isinstance(body[0], ast.Expr) and \
        isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str) else body[0]
    return fn.end_lineno - first.lineno + 1


def test_own_modules_are_imported_at_module_top():
    offenders = []
    for rel, tree in SOURCES:
        if rel in LAZY_MODULES:
            continue
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                for name in _module_names(node):
                    if name.split(".")[0] == "lipsdp" and name not in LAZY_OK:
                        offenders.append(f"{rel}:{node.lineno} {fn.name} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_no_private_names_across_modules():
    offenders = [f"{rel}:{node.lineno} from {node.module} import {alias.name}"
                 for rel, tree in SOURCES for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lipsdp")
                 for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not offenders, "\n".join(offenders)


def test_module_sizes():
    lines = {rel: len(Path(REPO, rel).read_text().splitlines()) for rel, _ in SOURCES}
    too_long = [f"{rel}: {n} lines" for rel, n in lines.items() if n > 420 and rel not in ONE_ALGORITHM]
    assert not too_long, "\n".join(too_long)


def test_stage_functions_are_short():
    long = [f"{rel}:{fn.lineno} {fn.name}: {_code_lines(fn)} lines"
            for rel, tree in SOURCES if Path(rel).stem in STAGES
            for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            and _code_lines(fn) > 60]
    assert not long, "\n".join(long)


def test_the_checks_see_a_violation():
    # The AST checks must fail on what they are meant to catch.
    bad = ast.parse("def f():\n    from lipsdp.lmi import build_lmi\n\nfrom lipsdp.solvers.ipm_ import _IPM\n")
    inner = [name for fn in ast.walk(bad) if isinstance(fn, ast.FunctionDef)
             for node in ast.walk(fn) for name in _module_names(node)]
    private = [a.name for node in ast.walk(bad) if isinstance(node, ast.ImportFrom) for a in node.names
               if a.name.startswith("_")]
    assert inner == ["lipsdp.lmi"] and private == ["_IPM"]


def test_import_lipsdp_is_light():
    code = ("import sys, lipsdp; heavy = [m for m in ('torch', 'cvxpy', 'scs', 'mosek', 'sdpa', 'clarabel', "
            "'cvxopt', 'lipsdp.solvers', 'lipsdp.pipeline') if m in sys.modules]; print(heavy); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.skipif(shutil.which("lint-imports") is None and
                    not (Path(sys.executable).parent / "lint-imports").exists(),
                    reason="import-linter is not installed (pip install -e '.[dev]')")
def test_import_contracts():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    run = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
