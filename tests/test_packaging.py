"""What a user gets from `pip install torch-agd`: the sdist and the wheel, built as a release
would build them, carry the licence text and py.typed, and the wheel works on its own in a clean
virtual environment (`import torch_agd`, `agd --help`).

The wheel is built from the sdist, as pip builds a package from PyPI, so a file the sdist lacks
breaks the wheel here too. Building runs setuptools' PEP 517 hooks in a separate process: with
this interpreter's setuptools when it meets pyproject's build requirement (no network), else with
one pip installs into a scratch folder.
"""

from __future__ import annotations

import email
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the source tree holds that a release does not build from.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs",
                                    ".pytest_cache", ".hypothesis", "*.pyc")


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but what is installed
    env.update(kwargs.pop("env", {}))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _build_backend_path(tmp: Path) -> str:
    """A PYTHONPATH under which setuptools meets pyproject's [build-system] requirement."""
    text = (REPO / "pyproject.toml").read_text()
    minimum = int(re.search(r'requires = \["setuptools>=(\d+)"\]', text).group(1))
    if int(importlib.metadata.version("setuptools").split(".")[0]) >= minimum:
        return ""
    _run([sys.executable, "-m", "pip", "install", "-q", "--target", str(tmp / "backend"), f"setuptools>={minimum}"])
    return str(tmp / "backend")


def _hook(hook: str, source: Path, out: Path, backend_path: str) -> Path:
    """Run setuptools' PEP 517 build_sdist/build_wheel hook in `source`; the file it built."""
    out.mkdir(parents=True, exist_ok=True)
    code = f"import setuptools.build_meta as b; print(b.{hook}({str(out)!r}))"
    result = _run([sys.executable, "-c", code], cwd=source, env={"PYTHONPATH": backend_path} if backend_path else {})
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    backend = _build_backend_path(tmp)
    sdist = _hook("build_sdist", source, tmp / "dist", backend)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = _hook("build_wheel", unpacked, tmp / "dist", backend)
    return {"sdist": sdist, "wheel": wheel, "tmp": tmp}


@pytest.mark.slow
def test_sdist_carries_the_licence_and_py_typed(built):
    with tarfile.open(built["sdist"]) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = set(tar.getnames())
        license_text = tar.extractfile(f"{top}/LICENSE").read().decode()
        metadata = email.message_from_bytes(tar.extractfile(f"{top}/PKG-INFO").read())
    assert f"{top}/torch_agd/py.typed" in names and f"{top}/torch_agd/data/cache.py" in names
    assert license_text == (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n\nCopyright (c) 2026 the torch-agd authors\n")
    assert metadata["License-Expression"] == "MIT" and metadata.get_all("License-File") == ["LICENSE"]


@pytest.mark.slow
def test_wheel_carries_the_licence_and_py_typed(built):
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        license_text = whl.read(f"{info}/licenses/LICENSE").decode()
        metadata = email.message_from_bytes(whl.read(f"{info}/METADATA"))
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    assert "torch_agd/py.typed" in names and "torch_agd/data/system.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))]
    assert license_text == (REPO / "LICENSE").read_text()
    assert metadata["License-Expression"] == "MIT" and metadata.get_all("License-File") == ["LICENSE"]
    assert "agd = torch_agd.cli:main" in entry_points


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_clean_venv(built):
    import torch

    venv = built["tmp"] / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(built["wheel"])])
    # torch (a 2+ GB download) comes from this interpreter's site-packages, appended to the venv's
    # sys.path after the venv's own site-packages, so the wheel's torch_agd is the one found.
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (site / "torch-from-the-test-interpreter.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    elsewhere = built["tmp"]  # not the repository: its torch_agd/ must not be importable
    code = ("import importlib.resources, torch_agd; print(torch_agd.__file__); print(torch_agd.__version__); "
            "print(importlib.resources.files('torch_agd').joinpath('py.typed').is_file())")
    where, version, typed = _run([str(python), "-c", code], cwd=elsewhere).stdout.split()
    assert Path(where).is_relative_to(venv) and typed == "True"
    assert version == re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    usage = _run([str(venv / "bin" / "agd"), "--help"], cwd=elsewhere).stdout
    assert usage.startswith("usage: agd") and "train" in usage and "sweep" in usage
