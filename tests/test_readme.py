"""README.md runs as written, offline, so it cannot rot.

``tests/readme_runner.py`` runs in a subprocess cut off from the network
(a new network namespace with only loopback up, else a socket guard in every
Python process; see ``tests/offline.py``): it starts the README's own
``crossguard serve --tiny --demo-upstream`` line, then runs every Python
block of the README as written, top to bottom, in one namespace. Nothing is
injected: the README's blocks define what they use (the tiny guard, the
bundled tokenizers, the demo's tiny models) themselves.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import crossguard

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
LAYERS = ("adapter", "guard", "integrations")


def test_the_readme_has_python_blocks_to_run():
    assert len(BLOCKS) >= 10


def test_the_readme_test_command_is_what_ci_runs():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command in README


def test_every_name_the_readme_imports_is_public_in_crossguard():
    imported = [
        (node.module, alias.name)
        for code in BLOCKS
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LAYERS
        for alias in node.names
    ]
    assert len(imported) >= 20
    for module, name in imported:
        assert name in crossguard.__all__, f"README imports {name} from {module}; crossguard does not re-export it"
        assert getattr(crossguard, name) is getattr(__import__(module, fromlist=[name]), name)
    table = README[README.index("## Public names") : README.index("## Integrations")]
    for name in crossguard.__all__:
        assert name == "__version__" or f"`{name}`" in table, f"{name} is not in the README's table of public names"


def test_every_python_block_runs_as_written_top_to_bottom_offline(tmp_path):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "tests.readme_runner", str(ROOT / "README.md")],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    steps = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    report = f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert steps and "network" in steps[0], report
    # Cut off, one way or the other: nothing outside loopback answers, no name resolves.
    assert steps[0]["network"] in ("network namespace", "user and network namespace", "socket guard"), report
    probe = steps[0]["probe"]
    assert probe["outside"].startswith("refused") and probe["dns"].startswith("refused"), probe
    assert probe["loopback"] == "connected"
    failed = [step for step in steps if step.get("ok") is False]
    assert not failed, f"README.md block at line {failed[0]['block']} failed:\n{failed[0]['error']}\n{report}"
    assert result.returncode == 0, report
    assert {"blocks": len(BLOCKS)} in steps, report
    gateway = next(step for step in steps if "gateway_exit" in step)
    assert gateway["gateway_exit"] == 0 and "MEANINGLESS" in gateway["gateway_output"], gateway


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings (lower case, punctuation dropped,
    spaces to hyphens, a repeated one suffixed -1, -2, ...)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M), flags=re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        number, unique = 0, anchor
        while unique in anchors:
            number += 1
            unique = f"{anchor}-{number}"
        anchors.add(unique)
    return anchors


def test_every_link_inside_the_readme_finds_its_heading():
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert len(links) >= 15
    missing = sorted(set(links) - github_anchors(README))
    assert not missing, f"links to headings that do not exist (renamed?): {missing}"


def test_a_guarded_generation_prints_in_one_short_line():
    """The README prints guarded_generate's result: its ids and judged pieces
    (one verdict per generator token) are left out of the repr."""
    from adapter import JudgedPiece
    from guard import Verdict
    from integrations.transformers import GuardedGeneration

    verdict = Verdict(0, "Safe", 0.99, None, None, unsafe=False)
    pieces = [JudgedPiece(index, "word", index, index + 4, verdict, 0) for index in range(2000)]
    result = GuardedGeneration("Dig around the roots.", list(range(2000)), verdict, pieces, attempts=1)
    shown = repr(result)
    assert len(shown) < 400 and "\n" not in shown, shown
    assert shown.startswith("GuardedGeneration(text='Dig around the roots.'") and "attempts=1, flagged=False" in shown
    assert result.pieces == pieces and len(result.ids) == 2000  # still all there
