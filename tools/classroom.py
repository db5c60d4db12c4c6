"""The chapters' exercises, read from their nbgrader markup: one place for every tool.

The chapters in notebooks/ are nbgrader *source* notebooks. Their exercise section starts
at a Markdown cell whose first line is `## Exercises` and runs to the end: an imports
cell, then per exercise a task (Markdown, "**Exercise N (task|quick check|written).**"),
a solution cell (`nbgrader.solution`, `### BEGIN SOLUTION`), a locked graded test cell
(`nbgrader.grade`, visible checks, `### BEGIN HIDDEN TESTS`, `checks.passed(...)`), and
instructors' key cells (tag `instructors-key`); the last cell prints the hand-in summary.
Each test cell says what it tests in a comment: `# visible: ...` at its top and
`# hidden: ...` as the first line of its hidden block.

Used by
- book/_ext/hide_answers.py: the published page shows stubs and visible tests only;
- tools/student.py (`make student`) and tools/course.py (an nbgrader course);
- tools/check_book.py: the secrets that must not appear on any page;
- book/_ext/hide_answers.py's `exercise-table` and `chapter-times` directives (the
  instructors' page).
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KEY_TAG = "instructors-key"
SECTION = "## Exercises"
MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION", "### BEGIN HIDDEN TESTS",
           "### END HIDDEN TESTS")


def nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_key(cell) -> bool:
    return KEY_TAG in cell.get("metadata", {}).get("tags", [])


def chapters(folder: Path = NOTEBOOKS) -> list[Path]:
    """Every notebook of `folder` that holds nbgrader cells (the chapters with exercises)."""
    out = []
    for path in sorted(folder.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if any(nbgrader_meta(c) for c in nb.cells):
            out.append(path)
    return out


def title(nb) -> str:
    """The notebook's `# ` heading."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return "untitled"


@dataclass
class Exercise:
    """One exercise of a chapter, as its markup says."""

    number: int
    kind: str  # task | quick check | written
    task: str  # the first sentence of the exercise text
    points: int  # 0 for written questions (graded by hand)
    grade_id: str | None  # the graded test cell's id (None: written)
    visible: str
    hidden: str
    key: bool  # an instructors' key cell follows
    question: bool = False  # the text asks a question in words (it needs a key)


_HEAD = re.compile(r"\*\*Exercise (\d+) \(([^)]+)\)\.\*\*\s*(.*)", re.DOTALL)


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.+?[.?!])(\s|$)", text)
    return (match.group(1) if match else text).strip()


def _comment(source: str, prefix: str) -> str:
    for line in source.splitlines():
        if line.strip().startswith(f"# {prefix}:"):
            return line.strip()[len(prefix) + 3:].strip()
    return ""


def _signature(source: str) -> str:
    """`name(args)` of the first def of a solution cell; for a class, `Class.forward`."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            return f"`{node.name}({', '.join(a.arg for a in node.args.args)})`"
        if isinstance(node, ast.ClassDef):
            methods = [n.name for n in node.body if isinstance(n, ast.FunctionDef)
                       and n.name != "__init__"]
            return f"`{node.name}.{methods[0]}`" if methods else f"`{node.name}`"
    return ""


def exercises(nb) -> list[Exercise]:
    """The exercises of a chapter, in order."""
    out: list[Exercise] = []
    for cell in section(nb):
        if cell.cell_type == "markdown" and not is_key(cell):
            match = _HEAD.search(cell.source)
            if match:
                out.append(Exercise(int(match.group(1)), match.group(2),
                                    _first_sentence(match.group(3)), 0, None, "", "", False,
                                    "?" in match.group(3)))
                continue
        if not out:
            continue
        meta = nbgrader_meta(cell)
        if meta.get("solution") and cell.cell_type == "code" and _signature(cell.source):
            out[-1].task = _signature(cell.source)
        if meta.get("grade") and cell.cell_type == "code":
            out[-1].points = int(meta.get("points", 0))
            out[-1].grade_id = meta["grade_id"]
            out[-1].visible = _comment(cell.source, "visible")
            out[-1].hidden = _comment(cell.source, "hidden")
        elif is_key(cell):
            out[-1].key = True
    return out


def section(nb) -> list:
    """The cells of the exercise section (from the `## Exercises` cell to the end)."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith(SECTION):
            return nb.cells[i:]
    return []


def setup_cell(nb):
    """The chapter's first code cell: on Colab it installs the package."""
    return next(c for c in nb.cells if c.cell_type == "code")


def assignment(nb, name: str):
    """The chapter's exercise section as a notebook of its own (an nbgrader assignment).

    Cells: a title, the chapter's set-up cell (installs the package on Colab), the
    section without its instructors' key cells. Outputs are kept (nbgrader clears them).
    """
    out = nbformat.v4.new_notebook(metadata=copy.deepcopy(nb.metadata))
    heading = nbformat.v4.new_markdown_cell(
        f"# Exercises: {title(nb)}\n\nThe exercises of the chapter `{name}` of the book; "
        "read the chapter first. Run every cell; the last one prints what you hand in.")
    out.cells = [heading, copy.deepcopy(setup_cell(nb))]
    out.cells += [copy.deepcopy(c) for c in section(nb) if not is_key(c)]
    return out


def cleared(nb):
    """The notebook as students may see it: nbgrader's ClearSolutions and ClearHiddenTests
    applied (outputs kept), instructors' key cells removed."""
    from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions

    nb = copy.deepcopy(nb)
    nb.cells = [c for c in nb.cells if not is_key(c)]
    resources: dict = {}
    for pre in (ClearSolutions(), ClearHiddenTests()):
        nb, resources = pre.preprocess(nb, resources)
    return nb


def normalise(line: str) -> str:
    """A line of source or of page text, compared without comment signs, Markdown
    emphasis, code and maths delimiters, or spacing (what rendering changes)."""
    line = line.strip().lstrip("#")
    for char in "*`$\\":
        line = line.replace(char, "")
    return " ".join(line.split())


def secrets(nb) -> list[str]:
    """Lines no published page may show: solution and hidden-test bodies, key text.

    Only distinctive lines: longer than 15 characters and not also present outside
    the secret regions of the notebook.
    """
    secret, public = set(), set()
    for cell in nb.cells:
        if is_key(cell):
            secret.update(cell.source.splitlines())
            continue
        inside = False
        for line in cell.source.splitlines():
            stripped = line.strip()
            if stripped in (MARKERS[0], MARKERS[2]):
                inside = True
            elif stripped in (MARKERS[1], MARKERS[3]):
                inside = False
            elif stripped:
                (secret if inside and nbgrader_meta(cell) else public).add(stripped)
    lines = {normalise(s) for s in secret} - {normalise(p) for p in public}
    return sorted(s for s in lines if len(s) > 15)


def run_seconds(nb) -> float | None:
    """Seconds the notebook's last execution took: the sum of its cells' recorded times
    (nbclient's `metadata.execution`), None if it holds none."""
    total, seen = 0.0, False
    for cell in nb.cells:
        timing = cell.get("metadata", {}).get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if start and end:
            seen = True
            total += (datetime.fromisoformat(end.replace("Z", "+00:00"))
                      - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
    return total if seen else None


def section_seconds(nb) -> float | None:
    """Like `run_seconds`, over the exercise section only (without its key cells: what an
    assignment runs)."""
    part = nbformat.v4.new_notebook()
    part.cells = [c for c in section(nb) if not is_key(c)]
    return run_seconds(part)
