"""The pages in ``docs/`` run: every code block marked ``run`` is executed, so the docs cannot rot.

Convention (in ``docs/*.md``): a fenced block opened with ```` ```python run ```` or ```` ```bash run ````
is executed; ```` ```python norun ```` / ```` ```bash norun ```` is shown only (it needs something a test
machine lacks, such as a MOSEK licence or a user's own model file). Every ``python`` and ``bash`` block must
say which, so nothing is left untested by accident. GitHub highlights ``python run`` as Python.

The blocks of one page run in order in one fresh interpreter (a subprocess, so a page that registers a
constraint or a backend does not leak into the rest of the suite): ``python`` blocks share one namespace,
``bash`` blocks run with ``bash -euo pipefail`` and must exit 0. The working directory is a temporary
folder with a link ``examples -> <repo>/examples``, so pages may write files and read
``examples/digits_mlp.pt``; the ``lipsdp`` command is this interpreter's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
EXPECTED_PAGES = {"formulations.md", "layers.md", "solvers.md", "certificates.md", "extending.md", "math.md",
                  "performance.md", "architecture.md"}
PAGE_TIMEOUT = 600  # seconds for all blocks of one page

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)

#: Runs the blocks of one page; argv[1] is a JSON list of {"lang", "code", "line"}.
DRIVER = r"""
import json, subprocess, sys, traceback
blocks = json.load(open(sys.argv[1]))
page = sys.argv[2]
namespace = {"__name__": "__main__"}
for b in blocks:
    where = f"{page}:{b['line']}"
    if b["lang"] == "python":
        try:
            exec(compile(b["code"], where, "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"\nFAILED: python block at {where}", file=sys.stderr)
            sys.exit(1)
    else:
        sys.stdout.flush()
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", b["code"]])
        if run.returncode:
            print(f"\nFAILED: bash block at {where} exited {run.returncode}", file=sys.stderr)
            sys.exit(1)
"""


def code_blocks(path: Path) -> list[dict]:
    """Fenced blocks of a markdown file: ``lang``, ``marker`` (``run``/``norun``/``""``), ``code``, ``line``."""
    text = path.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        words = m.group(1).split()
        blocks.append({"lang": words[0] if words else "", "marker": words[1] if len(words) > 1 else "",
                       "code": m.group(2), "line": text.count("\n", 0, m.start()) + 2})
    return blocks


def _ids(paths):
    return [p.name for p in paths]


def test_pages_exist():
    assert {p.name for p in PAGES} >= EXPECTED_PAGES, f"missing: {EXPECTED_PAGES - {p.name for p in PAGES}}"


def test_block_parser_sees_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python run\nx = 1\n```\n\n```bash norun\nlipsdp solvers\n```\n```\nplain\n```\n")
    blocks = code_blocks(page)
    assert [(b["lang"], b["marker"], b["line"]) for b in blocks] == [("python", "run", 3), ("bash", "norun", 7),
                                                                    ("", "", 10)]
    assert blocks[0]["code"] == "x = 1\n"


@pytest.mark.parametrize("path", PAGES, ids=_ids(PAGES))
def test_blocks_are_marked(path):
    """Every python / bash block says ``run`` or ``norun``, and each page runs at least one."""
    blocks = code_blocks(path)
    unmarked = [b["line"] for b in blocks if b["lang"] in ("python", "bash") and b["marker"] not in ("run", "norun")]
    assert not unmarked, f"{path.name}: blocks at lines {unmarked} need 'run' or 'norun' after the language"
    assert any(b["marker"] == "run" for b in blocks), f"{path.name} has no runnable block"


@pytest.mark.parametrize("path", PAGES + [REPO / "README.md"], ids=_ids(PAGES) + ["README.md"])
def test_relative_links_resolve(path):
    """Relative links point at files of this repository (a reader of one checkout can follow them all)."""
    text = path.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        resolved = (path.parent / target).resolve()
        assert REPO.resolve() in resolved.parents, f"{path.name} links outside the repository: {target}"
        assert resolved.exists(), f"{path.name} links to missing {target}"


def _heading_anchors(path: Path):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.*?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, 0) + 1
        yield slug if seen[slug] == 1 else f"{slug}-{seen[slug] - 1}"


@pytest.mark.parametrize("path", PAGES + [REPO / "README.md"], ids=_ids(PAGES) + ["README.md"])
def test_anchors_resolve(path):
    """``page.md#section`` links name a heading that exists (renaming a heading breaks them silently)."""
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        dest = (path.parent / target).resolve() if target else path
        assert anchor in set(_heading_anchors(dest)), f"{path.name} links to a missing heading: {target}#{anchor}"


#: A citation of the math page, as code comments and docs write it: ``docs/math.md §1.4``, ``math.md §10``.
MATH_CITATION = re.compile(r"math\.md §(\d+(?:\.\d+)?)")


def test_math_citations_name_existing_sections():
    """Every ``math.md §N`` cited in the code, tests, benchmarks and docs is a section of docs/math.md."""
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (DOCS / "math.md").read_text(), re.M))
    assert {"0", "1.4", "4.1", "5.2", "8.1", "8.2", "8.4", "9", "10"} <= sections
    code_dirs = ("lipsdp", "constraints", "solvers", "benchmarks", "tests")
    files = {f.resolve() for d in code_dirs for f in (REPO / d).rglob("*.py")}
    files |= {p.resolve() for p in PAGES} | {(REPO / "README.md").resolve()}
    wrong = [f"{f.relative_to(REPO.resolve())}: §{n}" for f in sorted(files)
             for n in MATH_CITATION.findall(f.read_text(errors="replace")) if n not in sections]
    assert not wrong, f"citations of missing docs/math.md sections: {wrong}"


def test_readme_links_every_page():
    readme = (REPO / "README.md").read_text()
    for page in PAGES:
        assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"


#: Pages whose runnable blocks take over ~10 s: CI's ``-m slow`` step runs them on every landing.
SLOW_PAGES = {"robustness.md", "certificates.md"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_PAGES else p
                                  for p in PAGES], ids=_ids(PAGES))
def test_page_runs(path, tmp_path):
    blocks = [{"lang": b["lang"], "code": b["code"], "line": b["line"]}
              for b in code_blocks(path) if b["marker"] == "run"]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(blocks))
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, "-c", DRIVER, str(spec), f"docs/{path.name}"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=PAGE_TIMEOUT)
    assert run.returncode == 0, f"docs/{path.name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
