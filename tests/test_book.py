"""The book's structure and the notebook conventions every chapter follows.

The conventions (see README, "Writing a chapter"): a chapter is `notebooks/NN_name.py`
(jupytext percent) paired with `notebooks/NN_name.ipynb` committed with outputs; it opens
with a title and "In this chapter you will learn"; its setup cell installs the package on
Colab only; it never edits `sys.path`; no version or timing output is under an output check.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CHAPTERS = ["01_dataset", "02_encoder", "03_attention", "04_decoder", "05_training", "06_inference",
            "07_hard_attention"]


def _tools():
    spec = importlib.util.spec_from_file_location("nbtools", ROOT / "tools" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part["chapters"]]
    return files


def test_toc_files_exist_and_every_notebook_is_in_the_toc():
    files = _toc_files()
    for f in files:
        assert (ROOT / f).with_suffix(".md").exists() or (ROOT / f).with_suffix(".ipynb").exists(), f
    listed = {f.split("/")[-1] for f in files}
    assert {nb.stem for nb in NOTEBOOKS} <= listed
    chapters = [f.split("/")[-1] for f in files if re.match(r"notebooks/\d\d_", f)]
    assert chapters == [c for c in CHAPTERS if c in chapters], "chapters out of order"
    appendix = [f.split("/")[-1] for f in files if re.match(r"notebooks/[a-z]", f)]
    assert appendix == _tools().APPENDIX


def test_config_has_execution_launch_buttons_and_bibliography():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] in {"force", "cache"}
    assert config["execute"]["timeout"] > 0
    assert config["launch_buttons"]["colab_url"].startswith("https://colab.research.google.com")
    assert config["repository"]["url"].startswith("https://github.com/")
    bib = (ROOT / config["bibtex_bibfiles"][0]).read_text()
    for key in ["xu2015show", "he2016deep", "bahdanau2015neural", "hochreiter1997long",
                "papineni2002bleu", "vedantam2015cider", "karpathy2015deep"]:
        assert f"{{{key}," in bib, key


def test_notebooks_are_in_sync_with_their_scripts():
    tools = _tools()
    problems = [why for s, n in tools.pairs() if (why := tools.out_of_sync(s, n))]
    assert not problems, problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_convention(path):
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
    assert "In this chapter you will learn" in cells[0].source
    setup = next(c for c in cells if c.cell_type == "code")
    assert '"google.colab" in sys.modules' in setup.source
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert f'REPO_URL = "{repo}"' in setup.source, "setup cell must install from _config.yml's repository"
    for cell in cells:
        if cell.cell_type != "code":
            continue
        src = cell.source
        assert "sys.path.insert" not in src and "sys.path.append" not in src
        assert cell.execution_count is not None, f"cell not executed: {src[:60]!r}"
        assert not any(o.output_type == "error" for o in cell.outputs), src[:60]
        if "NBVAL_CHECK_OUTPUT" in src:
            printed = [line for line in src.splitlines() if "print(" in line]
            for line in printed:
                assert not re.search(r"__version__|perf_counter|time\.|\bdevice\b|seconds", line), (
                    f"environment-dependent output under a check: {line!r}")


def _markdown_headings(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [line[3:].strip() for c in nb.cells if c.cell_type == "markdown"
            for line in c.source.splitlines() if line.startswith("## ")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_chapter_ends_with_summary_and_exercises(path):
    assert _markdown_headings(path)[-2:] == ["Summary", "Exercises"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_figure_has_alt_text_and_every_plotting_cell_shows_one(path):
    nb = nbformat.read(path, as_version=4)
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        alt = cell.metadata.get("mystnb", {}).get("image", {}).get("alt", "")
        if images:
            assert alt.strip(), f"a figure without alt text (mystnb.image.alt): {cell.source[:60]!r}"
        if "plt.show()" in cell.source or alt:
            assert images, f"a plotting cell that shows no figure: {cell.source[:60]!r}"


def test_the_setup_cell_of_every_notebook_is_collapsed():
    for script, notebook in _tools().pairs():
        nb = nbformat.read(notebook, as_version=4)
        setup = next(c for c in nb.cells if c.cell_type == "code")
        assert "hide-input" in setup.metadata.get("tags", []), notebook.name


def test_every_image_in_the_prose_has_alt_text():
    sources = [ROOT / "README.md", *sorted((ROOT / "book").glob("*.md"))]
    texts = {p.name: p.read_text() for p in sources}
    for script, notebook in _tools().pairs():
        nb = nbformat.read(notebook, as_version=4)
        texts[notebook.name] = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for name, text in texts.items():
        assert not re.findall(r"!\[\s*\]\(", text), f"{name}: an image without alt text"
        assert not re.findall(r"<img(?![^>]*\balt=\"[^\"]+\")[^>]*>", text), f"{name}: <img> without alt"
        for block in re.findall(r"```\{(?:image|figure)\}[^`]*```", text):
            assert ":alt:" in block, f"{name}: image/figure directive without :alt:"


def test_the_results_page_reads_its_numbers_from_files():
    source = (ROOT / "notebooks" / "results.py").read_text()
    for reads in ["ensure_trained(", "recipe(DATASET)", "run.history", "evaluate(",
                  "benchmarks/results", "json.loads("]:
        assert reads in source, reads
    prose = "\n".join(line for line in source.splitlines() if line.startswith("# ")
                       and not line.startswith("# %%"))
    assert not re.findall(r"\d+\.\d+ ?(?:×|x\b|s\b|%)", prose), "a typed number in the prose"


def test_maths_is_served_by_the_book_itself():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]
    assert not config["mathjax_path"].startswith(("http:", "https:", "//"))
    vendor = config["html_static_path"][0]
    makefile = (ROOT / "Makefile").read_text()
    assert f"MATHJAX := {vendor}/{config['mathjax_path']}" in makefile
    assert re.search(r"^MATHJAX_SHA256 := [0-9a-f]{64}$", makefile, flags=re.MULTILINE)
    assert "sha256sum --check" in makefile
    assert vendor in (ROOT / ".gitignore").read_text()


def test_ci_checks_the_book_in_a_browser_after_building_it():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("make book") < ci.index("make check-book")
    assert "tools/check_book.py" in (ROOT / "Makefile").read_text()


def test_each_script_is_loaded_once_per_page():
    spec = importlib.util.spec_from_file_location("unique_scripts",
                                                  ROOT / "book" / "_ext" / "unique_scripts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Script:  # like sphinx.builders.html._assets._JavaScript
        def __init__(self, filename, **attributes):
            self.filename, self.attributes = filename, attributes

    thebe = Script(None, body="const THEBE_JS_URL = 1")
    context = {"script_files": [Script("a.js"), thebe, Script("b.js", defer="defer"),
                                Script("", body="const THEBE_JS_URL = 1"), Script("b.js")]}
    module.drop_repeated_scripts(None, "page", "page.html", context, None)
    kept = context["script_files"]
    assert [(s.filename, s.attributes) for s in kept] == [
        ("a.js", {}), (None, {"body": "const THEBE_JS_URL = 1"}), ("b.js", {"defer": "defer"}),
        ("b.js", {})]
    assert kept[1] is thebe


def _write_raising_notebook(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter that breaks"),
                nbformat.v4.new_code_cell("raise RuntimeError('planted failure')")]
    path = folder / "broken.ipynb"
    nbformat.write(nb, path)
    return path


def test_a_raising_cell_fails_nbval(tmp_path):
    path = _write_raising_notebook(tmp_path)
    run = subprocess.run([sys.executable, "-m", "pytest", str(path), "--nbval-lax",
                          "--nbval-current-env", "-p", "no:cacheprovider", "-q"],
                         check=False, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0
    assert "planted failure" in run.stdout


def test_a_raising_cell_fails_the_book_build(tmp_path):
    _write_raising_notebook(tmp_path)
    (tmp_path / "_config.yml").write_text(
        "title: broken\nexecute:\n  execute_notebooks: force\n  timeout: 60\n")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: broken\n")
    jb = Path(sys.executable).with_name("jupyter-book")
    run = subprocess.run([str(jb), "build", "-W", "-n", "--keep-going", str(tmp_path)],
                         check=False, capture_output=True, text=True)
    assert run.returncode != 0
    report = tmp_path / "_build" / "html" / "reports" / "broken.err.log"
    assert "planted failure" in report.read_text()
