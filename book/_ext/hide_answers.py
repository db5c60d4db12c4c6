"""Sphinx extension: the published book gives no answer away; the instructors' tables.

The chapters are nbgrader *source* notebooks: their exercise cells hold the reference
solutions and hidden tests, and they run that way when the book is built (so the build
proves every exercise solvable). What a page *shows* is what a student gets:

- `doctree-read`: in every code cell with nbgrader markup, the shown source is replaced
  by what nbgrader's own `ClearSolutions` and `ClearHiddenTests` make of it (solution
  region -> `# YOUR CODE HERE` / `raise NotImplementedError()`, hidden-test block
  removed). The cell has already run, so its output ("Exercise N: correct") is real.
  Instructors' key cells carry the tag `remove-cell`, which MyST-NB drops by itself.
- `build-finished`: the notebooks copied to `_sources/` (the page's download button;
  `.ipynb`, or `.ipynb.txt` with Sphinx's default suffix) are replaced by the same
  cleared version, outputs kept.

Reference solutions are left out of the page rather than put in a collapsed block: a
collapsed block is one click away and sits in the page's HTML and search index, so a
student would see it while working. They are in the repository's notebooks/ (see *For
instructors*).

Directives for book/instructors.md, computed from the notebooks at build time:
`{exercise-table}` (chapter, exercise, kind, what the student writes, visible and hidden
tests, points, key) and `{chapter-times}` (the recorded run of each chapter and of its
exercise section). The logic lives in tools/classroom.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import classroom  # tools/classroom.py


def cleared_source(source: str, metadata: dict) -> str:
    """A cell's source as the student version shows it (nbgrader's own clearing)."""
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell(source, metadata=dict(metadata))]
    return classroom.cleared(nb).cells[0].source


def hide_answers(app, doctree) -> None:
    """Show every nbgrader cell of a page the way the student version has it."""
    for cell in doctree.findall(nodes.container):
        if cell.get("nb_element") != "cell_code":
            continue
        metadata = cell.get("cell_metadata", {}) or {}
        meta = metadata.get("nbgrader", {})
        if not (meta.get("solution") or meta.get("grade")):
            continue
        for block in cell.findall(nodes.literal_block):
            if block.parent.get("nb_element") != "cell_code_source":
                continue
            text = cleared_source(block.astext(), metadata)
            block.children = [nodes.Text(text)]
            block.rawsource = text


def clear_downloads(app, exception) -> None:
    """Replace the notebooks of `_sources/` (download button) by their cleared version."""
    if exception is not None or app.builder.format != "html":
        return
    import nbformat

    sources = Path(app.outdir, "_sources")
    for path in [*sources.rglob("*.ipynb"), *sources.rglob("*.ipynb.txt")]:
        nb = nbformat.read(path, as_version=4)
        if any(classroom.nbgrader_meta(c) for c in nb.cells) or any(
                classroom.is_key(c) for c in nb.cells):
            nbformat.write(classroom.cleared(nb), path)


class _MarkdownTable(Directive):
    """A directive whose content is a Markdown table computed from the notebooks."""

    has_content = False

    def lines(self) -> list[str]:
        raise NotImplementedError

    def run(self):
        env = self.state.document.settings.env
        for path in classroom.chapters(ROOT / "notebooks"):
            env.note_dependency(str(path))
        node = nodes.container()
        self.state.nested_parse(StringList(self.lines()), self.content_offset, node)
        return node.children


def _chapter_name(path: Path, nb) -> str:
    number = path.stem.split("_")[0].lstrip("0")
    return f"{number} {classroom.title(nb).split(':')[0]}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "—"


class ExerciseTable(_MarkdownTable):
    def lines(self) -> list[str]:
        import nbformat

        head = ("| chapter | exercise | kind | the student writes | visible tests "
                "| hidden tests | points | key |")
        out = [head, "|---|---|---|---|---|---|---|---|"]
        for path in classroom.chapters(ROOT / "notebooks"):
            nb = nbformat.read(path, as_version=4)
            for ex in classroom.exercises(nb):
                points = str(ex.points) if ex.grade_id else "by hand"
                out.append(f"| {_chapter_name(path, nb)} | {ex.number} | {ex.kind} | "
                           f"{_cell(ex.task)} | {_cell(ex.visible)} | {_cell(ex.hidden)} | "
                           f"{points} | {'yes' if ex.key else 'no'} |")
        return out


class ChapterTimes(_MarkdownTable):
    def lines(self) -> list[str]:
        import nbformat

        out = ["| chapter | whole chapter | its exercise section | exercises | autograded points |",
               "|---|---|---|---|---|"]
        for path in classroom.chapters(ROOT / "notebooks"):
            nb = nbformat.read(path, as_version=4)
            whole, part = classroom.run_seconds(nb), classroom.section_seconds(nb)
            exs = classroom.exercises(nb)
            out.append(f"| {_chapter_name(path, nb)} | {_seconds(whole)} | {_seconds(part)} | "
                       f"{len(exs)} | {sum(e.points for e in exs)} |")
        return out


def _seconds(value: float | None) -> str:
    if value is None:
        return "not recorded"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def setup(app):
    app.connect("doctree-read", hide_answers)
    app.connect("build-finished", clear_downloads)
    app.add_directive("exercise-table", ExerciseTable)
    app.add_directive("chapter-times", ChapterTimes)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
