"""The package builds and installs cleanly: ``pip wheel .``, then the wheel in a fresh venv.

The sources the wheel is built from (``pyproject.toml``, ``README.md``, ``LICENSE``, ``fabric/``)
are copied to a temp dir first, so the build leaves nothing in the checkout. The build is
``pip wheel --no-deps`` with pip's build isolation, as on a fresh machine (it fetches the
``setuptools`` that ``[build-system]`` asks for). Its verbose output must hold no warning of ours
(deprecated metadata such as the license table, a missing license file, package data setuptools
would drop), and the wheel must carry the license and the dashboard's static files. The wheel is
then installed with ``--no-deps`` into a new venv that sees this environment's packages through
a ``.pth`` path (so torch is not downloaded), and its ``fabric`` script answers ``--version``
with the distribution's version, warning-free, importing ``fabric`` from that venv.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
_ENVIRONMENT_NOTES = re.compile(r"WARNING: Location '.*' is ignored")
"""pip's note about a find-links directory of this machine's pip configuration, not ours."""


def run(*args: str | Path, cwd: Path | None = None) -> str:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(
        [str(arg) for arg in args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=cwd,
        env=env,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def warnings_in(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if re.search(r"warn|deprecat", line, re.IGNORECASE) and not _ENVIRONMENT_NOTES.search(line)
    ]


def test_wheel_builds_and_installs_without_warnings(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "fabric", source / "fabric", ignore=shutil.ignore_patterns("__pycache__")
    )
    wheels = tmp_path / "wheels"
    build = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", wheels, ".", cwd=source
    )
    assert warnings_in(build) == []
    [wheel] = wheels.glob("kv_fabric-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for packaged in (
        "fabric/frontend/static/dashboard.html",
        "fabric/frontend/static/dashboard.js",
        "fabric/frontend/static/dashboard.css",
        "fabric/models/corpus.txt",
    ):
        assert packaged in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(purelib.strip()) / "outer-environment.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n"
    )
    installed = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel)
    assert warnings_in(installed) == []
    version = run(env_dir / "bin" / "fabric", "--version", cwd=tmp_path)
    assert version == f"fabric {metadata.version('kv-fabric')}\n"
    where = run(
        python, "-c", "import fabric.frontend.dashboard as d; print(d.__file__)", cwd=tmp_path
    )
    assert where.strip().startswith(str(env_dir))
