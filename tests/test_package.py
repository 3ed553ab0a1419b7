"""The package: pyproject.toml agrees with requirements.txt, and `cap` runs from any folder once installed."""
import os
import re
import shutil
import subprocess
import sys
import tomllib

from helpers import REPO


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_pin_exactly_the_declared_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    launchers = {_name(r) for r in project["optional-dependencies"]["launchers"]}
    lines = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line and line[0] not in "#-"]
    assert all("==" in line for line in lines), "requirements.txt pins every version"
    assert {_name(line) for line in lines} == declared
    optional = [line for line in (REPO / "requirements-optional.txt").read_text().splitlines() if line[:1] not in "#"]
    assert {_name(line) for line in optional if line} == launchers
    assert project["scripts"]["cap"] == "cap.__main__:main"


def test_installed_cap_composes_from_another_folder(tmp_path):
    """README's install makes `cap` a console script, and conf/ is found without the repo on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cap = shutil.which("cap")
    assert cap, "no `cap` on PATH: install with `pip install -r requirements.txt` (or `pip install -e .`)"
    for command in ([cap], [sys.executable, "-m", "cap"]):
        out = subprocess.run([*command, "experiment=quickstart", "--cfg", "job"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "max_train_samples: 2000" in out.stdout and "sequence:" in out.stdout
    assert not list(tmp_path.iterdir())  # --cfg job runs nothing and writes no run dir
