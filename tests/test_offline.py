"""tests/offline.py cuts the network both ways it knows, and says which.

The README test uses whichever works on the machine; here each way is forced
in its own subprocess and checked: nothing outside loopback answers, no name
resolves, loopback works, and a Python process started from there is cut
off too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHILD = "import json; from tests.offline import probe; print(json.dumps(probe()))"
SCRIPT = f"""
import json, subprocess, sys
import tests.offline as offline
if sys.argv[1] == "socket guard":
    def refused(flags):
        raise PermissionError(1, "Operation not permitted")
    offline._unshare = refused  # what a container that forbids namespaces answers
how = offline.cut_network()
child = subprocess.run([sys.executable, "-c", {CHILD!r}], capture_output=True, text=True, check=True)
print(json.dumps({{"how": how, "here": offline.probe(), "child": json.loads(child.stdout)}}))
"""


@pytest.mark.parametrize("forced", ["whatever the kernel allows", "socket guard"])
def test_the_network_is_cut_and_loopback_stays(forced, tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SCRIPT, forced], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env=environment)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    if forced == "socket guard":
        assert report["how"] == "socket guard"
    else:
        assert report["how"] in ("network namespace", "user and network namespace", "socket guard")
    for where in ("here", "child"):
        probe = report[where]
        assert probe["outside"].startswith("refused") and probe["dns"].startswith("refused"), (where, probe)
        assert probe["loopback"] == "connected"
