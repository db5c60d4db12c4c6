"""The install story: pyproject, environment.yml, constraints and the console script."""

from __future__ import annotations

import re
import subprocess
import sys

import tomllib
import yaml

from caption_lib.cli import main


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_dependencies(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = [d for d in env["dependencies"] if isinstance(d, str)]
    assert any(d.startswith("python>=3.10") for d in conda_pins)
    runtime = [d for d in pip_section if not d.startswith("-e")]
    assert sorted(runtime) == sorted(project["dependencies"])
    editable = next(d for d in pip_section if d.startswith("-e"))
    extras = set(re.search(r"\[(.*)\]", editable).group(1).split(","))
    assert {"book", "test"} <= extras <= set(project["optional-dependencies"])


def test_torch_is_a_range_so_colab_keeps_its_own(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        if _name(dep) in {"torch", "torchvision"}:
            assert "==" not in dep and ">=" in dep, dep
    pins = (repo_root / "constraints.txt").read_text()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
    assert "torch==2.14.1 torchvision==0.29.1" in (repo_root / "Makefile").read_text()


def test_extras_cover_the_packages_of_record(repo_root):
    extras = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {_name(d) for deps in extras.values() for d in deps}
    assert {"jupyter-book", "jupyterlab", "pytest", "nbval", "hypothesis",
            "pycocoevalcap", "nbgrader"} <= names
    assert any(d.startswith("jupyter-book") and "<2" in d for d in extras["book"])


def test_python_dash_m_and_console_script(capsys):
    out = subprocess.run([sys.executable, "-m", "caption_lib", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("caption-lib ")
    assert main(["info", "--json"]) == 0
    assert '"torch"' in capsys.readouterr().out


def test_ci_runs_the_readme_command(repo_root):
    ci = (repo_root / ".ci" / "run").read_text()
    readme = (repo_root / "README.md").read_text()
    assert "make test" in ci and "make book" in ci
    assert ci.index("make test") < ci.index("make book")
    assert "make test" in readme and "make book" in readme
