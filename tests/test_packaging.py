"""The package as a user installs it: a wheel built from this checkout, put
into a fresh virtual environment with its extras, then run.

Bounded cost, on purpose: the wheel is built offline with the setuptools
already installed (``pip wheel --no-deps --no-build-isolation``), and the
fresh environment sees this environment's installed packages through a
``.pth`` line, so pip resolves the extras against them with ``--no-index``
(nothing is downloaded; a requirement or an extra that no installed package
satisfies fails the install). The fresh environment's own site-packages then
holds the wheel's files and nothing else, and the checkout is not on the
path: every module the commands import comes from the wheel. What this does
not show is a resolution from PyPI from scratch; CI's ``pip install -e
'.[test]'`` does that with the same requirement strings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("adapter", "guard", "integrations", "crossguard")
EXTRAS = "gateway,ray,langchain,demo"


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_wheel_holds_every_module_and_installs_with_its_extras(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the
    # sources, and a stale build/ would put deleted modules into the wheel.
    source = tmp_path / "source"
    skip = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*skip))
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels,
         source])  # fmt: skip
    (wheel,) = wheels.glob("crossguard-*.whl")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert wheel.name.startswith(f"crossguard-{version}-")

    packaged = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.suffix == ".py" or path.name == "py.typed"
        if "__pycache__" not in path.parts
    }
    assert {f"{package}/py.typed" for package in PACKAGES} <= modules
    assert not modules - packaged, f"missing from the wheel: {sorted(modules - packaged)}"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    fresh = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (fresh / "installed-packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    run([python, "-m", "pip", "install", "-q", "--no-index", f"{wheel}[{EXTRAS}]"], cwd=tmp_path, env=environment)
    assert sorted(path.name for path in fresh.iterdir() if not path.name.endswith(".pth")) == sorted(
        [*PACKAGES, f"crossguard-{version}.dist-info"]
    )

    imports = "import adapter, guard, integrations, crossguard, integrations.gateway, integrations.demo_upstream"
    where = run([python, "-c", f"{imports}; print(crossguard.__file__, integrations.gateway.__file__)"],
                cwd=tmp_path, env=environment).stdout.split()  # fmt: skip
    assert all(Path(path).is_relative_to(fresh) for path in where), where
    script = venv / "bin" / "crossguard"
    assert run([script, "--version"], cwd=tmp_path, env=environment).stdout.strip() == f"crossguard {version}"
    demo = run([python, "-m", "crossguard", "demo", "--color", "never"], cwd=tmp_path, env=environment).stdout
    assert "MEANINGLESS" in demo and "FLAGGED at generator token" in demo
