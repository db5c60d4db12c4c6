"""The published book gives no answer away (book/_ext/hide_answers.py), without a browser.

A tiny Sphinx project with MyST-NB renders one nbgrader notebook (not executed: its
stored outputs are shown): with the extension, the page shows the task, the stub and the
visible tests and the test cell's output, but no solution line, no hidden test, no
instructors' key, and the notebook behind the download button is cleared too;
`tools/check_book.py`'s answer check passes. Without the extension (the planted fault)
the same check names the markers and the answers. The instructors' tables are built from
the real chapters.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]


_tool = load_tool


check_book = _tool("check_book")
classroom = _tool("classroom")

SOLUTION = {"grade": False, "grade_id": "ex1-solution", "locked": False, "schema_version": 3,
            "solution": True}
TEST = {"grade": True, "grade_id": "ex1-test", "locked": True, "points": 2, "schema_version": 3,
        "solution": False}


def _notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    test = nbformat.v4.new_code_cell(
        "# visible: one value\nassert double(2) == 4\n### BEGIN HIDDEN TESTS\n"
        "# hidden: negative numbers and zero\nassert double(-7) == -14 and double(0) == 0\n"
        "### END HIDDEN TESTS\nprint('Exercise 1: correct')", metadata={"nbgrader": TEST})
    test.outputs = [nbformat.v4.new_output("stream", name="stdout", text="Exercise 1: correct\n")]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A chapter"),
        nbformat.v4.new_markdown_cell("## Exercises"),
        nbformat.v4.new_markdown_cell("**Exercise 1 (quick check).** Write `double(x)`."),
        nbformat.v4.new_code_cell("def double(x):\n    ### BEGIN SOLUTION\n"
                                  "    return x + x  # the reference solution\n"
                                  "    ### END SOLUTION", metadata={"nbgrader": SOLUTION}),
        test,
        nbformat.v4.new_markdown_cell("**Key, exercise 1.** Adding a number to itself doubles it.",
                                      metadata={"tags": ["remove-cell", "instructors-key"]}),
    ]
    return nb


def _build(tmp: Path, extension: bool) -> Path:
    from sphinx.cmd.build import build_main

    src = tmp / "src"
    src.mkdir()
    nbformat.write(_notebook(), src / "chapter.ipynb")
    extensions = ["myst_nb"] + (["hide_answers"] if extension else [])
    (src / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'book' / '_ext')!r})\n"
        f"extensions = {extensions!r}\nnb_execution_mode = 'off'\nexclude_patterns = ['_build']\n")
    tables = "```{exercise-table}\n```\n\n```{chapter-times}\n```\n" if extension else ""
    (src / "index.md").write_text(f"# Book\n\n```{{toctree}}\nchapter\n```\n\n{tables}")
    out = tmp / "html"
    assert build_main(["-b", "html", "-q", "-W", str(src), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    return {name: _build(tmp_path_factory.mktemp(name), name == "hidden")
            for name in ("hidden", "shown")}


def _secrets() -> dict[str, list[str]]:
    return {"chapter.html": classroom.secrets(_notebook())}


def test_the_secrets_are_the_solution_hidden_tests_and_key():
    secrets = _secrets()["chapter.html"]
    assert "return x + x # the reference solution" in secrets
    assert "assert double(-7) == -14 and double(0) == 0" in secrets
    assert "hidden: negative numbers and zero" in secrets
    assert "Key, exercise 1. Adding a number to itself doubles it." in secrets
    assert not [s for s in secrets if "double(2)" in s or "YOUR CODE" in s]


def test_the_page_shows_task_stub_visible_tests_and_output_only(sites):
    parser = check_book._Text()
    parser.feed((sites["hidden"] / "chapter.html").read_text())
    html = "".join(parser.text)
    for shown in ["Write", "YOUR CODE HERE", "NotImplementedError", "double(2)",
                  "visible: one value", "Exercise 1: correct"]:
        assert shown in html, shown
    for hidden in ["BEGIN", "x + x", "double(-7)", "negative numbers", "Key, exercise",
                   "doubles it"]:
        assert hidden not in html, hidden
    assert check_book.html_answer_problems(sites["hidden"], _secrets()) == []
    search = (sites["hidden"] / "searchindex.js").read_text()
    assert "doubles" not in search and "negative" not in search


def test_the_download_is_the_student_version(sites):
    nb = nbformat.read(sites["hidden"] / "_sources" / "chapter.ipynb.txt", as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    assert "raise NotImplementedError()" in text and "x + x" not in text
    assert "double(-7)" not in text and "Key, exercise" not in text
    assert nb.cells[-1].outputs  # outputs kept


def test_without_the_extension_the_check_names_the_leaks(sites):
    problems = check_book.html_answer_problems(sites["shown"], _secrets())
    assert "chapter.html: nbgrader marker visible: '### BEGIN SOLUTION'" in problems
    assert "chapter.html: nbgrader marker visible: '### BEGIN HIDDEN TESTS'" in problems
    assert [p for p in problems if p.startswith("chapter.html: answer visible (")], problems
    assert [p for p in problems if p.startswith("chapter.html: download (_sources): answer visible")]


def test_the_instructors_tables_come_from_the_chapters(sites):
    parser = check_book._Text()
    parser.feed((sites["hidden"] / "index.html").read_text())
    text = " ".join("".join(parser.text).replace("\u2019", "'").split())  # smart quotes
    chapters = classroom.chapters()
    assert len(chapters) >= 6
    rows = 0
    for path in chapters:
        nb = nbformat.read(path, as_version=4)
        for ex in classroom.exercises(nb):
            if ex.grade_id:
                rows += 1
                assert ex.task.strip("`") in text, ex.task
                assert " ".join(ex.visible.split()) in text, ex.visible
    assert rows >= 12 and "by hand" in text
    assert text.count("autograded points") == 1


def test_a_progress_bar_left_in_a_cell_output_is_one_problem():
    """tqdm's bars written to a cell's stderr would be published with the page."""
    bars = ("decoding test:   0%|          | 0/10 [00:00<?, ?batch/s]\n"
            "decoding test: 100%|██████████| 10/10 [00:02<00:00,  4.87batch/s]\n")
    problems = check_book.progress_problems("bleu4 94.7\n" + bars)
    assert problems == ["progress bar in a cell's output: '0%|          | 0/10 ['"], problems
    table = "| k | semantic_f1 |\n| 1 | 0.964 |\nthe guard costs 6%| of the time, 3/4 ["
    assert check_book.progress_problems(table) == []
