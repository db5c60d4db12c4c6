"""The install story: pyproject, environment.yml, constraints and the console script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

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


# Colab's torch builds of 2024-2025 (CUDA wheels carry a local version) and their pairs
COLAB_TORCH = [("2.5.1+cu121", "0.20.1+cu121"), ("2.6.0+cu124", "0.21.0+cu124"),
               ("2.8.0+cu126", "0.23.0+cu126"), ("2.9.0+cu126", "0.24.0+cu126")]


def _fake_environment(folder, installed: dict[str, str]):
    """A venv without pip whose site-packages holds only the metadata of `installed`
    (name -> version): what pip's resolver sees of an environment, without the files."""
    import venv

    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name, version in installed.items():
        info = Path(site) / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("pip\n")
    return python


def _dry_run(python, requirements: list[str], tmp_path):
    """`pip install --dry-run` offline (no index at all); (exit code, names pip would install)."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                           "--dry-run", "--no-index", "--quiet", "--report", str(report),
                           *requirements], capture_output=True, text=True, check=False)
    if done.returncode:
        return done.returncode, None
    return 0, [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]


def test_installing_into_colab_keeps_its_torch(repo_root, tmp_path):
    """The Colab install (the setup cell's `pip install git+REPO`, without constraints.txt)
    asks pip for the package's ranges: in an environment that already has Colab's torch
    build, pip keeps it and installs nothing of the stack; the offline pin of
    constraints.txt would have to replace it (with no index, pip cannot: it fails)."""
    from packaging.requirements import Requirement

    dependencies = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {_name(d): Requirement(d).specifier for d in dependencies}
    for torch_version, vision_version in COLAB_TORCH:
        assert ranges["torch"].contains(torch_version), torch_version
        assert ranges["torchvision"].contains(vision_version), vision_version
    torch_version, vision_version = COLAB_TORCH[-1]
    installed = {"torch": torch_version, "torchvision": vision_version, "numpy": "2.0.2",
                 "pillow": "11.3.0", "matplotlib": "3.10.0", "nltk": "3.9.1", "tqdm": "4.67.1"}
    python = _fake_environment(tmp_path / "colab", installed)
    assert _dry_run(python, dependencies, tmp_path) == (0, []), "pip would change the stack"
    pins = [line for line in (repo_root / "constraints.txt").read_text().splitlines()
            if line.startswith(("torch==", "torchvision=="))]
    code, _ = _dry_run(python, [*dependencies, *pins], tmp_path)
    assert code != 0, "the exact pin cannot be met by Colab's torch: never use it there"
