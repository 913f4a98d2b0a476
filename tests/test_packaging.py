"""The project's contract with a new user: README, Makefile, CI entry, Dockerfile, wheel."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import pytest


def test_readme_starts_with_the_two_commands(repo):
    text = (repo / "README.md").read_text()
    blocks = re.findall(r"```(?:\w+)?\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no code block"
    first = [ln.strip() for ln in blocks[0].strip().splitlines() if ln.strip()]
    assert first == ["make demo", "make test"]


def test_ci_runs_make_test_only(repo):
    lines = [ln.strip() for ln in (repo / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert "make test" in lines
    assert not any(re.search(r"\bpip\b|apt-get", ln) for ln in lines), "CI installs via make only"


def _dockerfile(repo):
    return [ln.strip() for ln in (repo / "Dockerfile").read_text().splitlines()]


def test_dockerfile_structure(repo):
    lines = _dockerfile(repo)
    assert lines[next(i for i, ln in enumerate(lines) if ln.startswith("FROM"))].startswith(
        "FROM python:3.11-slim")
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split()[1] not in ("root", "0")
    assert 'ENTRYPOINT ["lesionlapse"]' in lines
    env = " ".join(ln for ln in lines if "=" in ln)
    for var in ("NIPYPE_NO_ET=1", "OMP_NUM_THREADS=", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=",
                "HOME=/tmp"):
        assert var in env
    assert any(ln.startswith("COPY sample_data") for ln in lines)


def test_dockerfile_installs_like_the_makefile(repo):
    """The image and `make test` (CI) install through the same script."""
    docker = "\n".join(_dockerfile(repo))
    make = (repo / "Makefile").read_text()
    assert "sh scripts/install.sh" in docker and "sh scripts/install.sh" in make
    assert "pip install" not in docker, "the Dockerfile must not install by other means"


@pytest.mark.slow
def test_wheel_ships_default_config(repo, tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(repo)], check=True)
    wheel = next(tmp_path.glob("lesionlapse-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        shipped = zf.read("pipeline/data/default.toml")
        assert "pipeline/reports/templates/subject.html" in zf.namelist()
    assert shipped == (repo / "configs" / "default.toml").read_bytes()
