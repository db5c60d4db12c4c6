"""Build the student versions of the chapters: `make student` (writes student/).

The chapters in notebooks/ are the *solution* notebooks (nbgrader's "source" versions):
exercise solutions sit between `### BEGIN SOLUTION` / `### END SOLUTION` in cells marked
`nbgrader.solution = true`, graded test cells may hold `### BEGIN HIDDEN TESTS` blocks.
This script runs nbgrader's own preprocessors through nbconvert, nothing hand-written:

    ClearSolutions    solution code -> "# YOUR CODE HERE / raise NotImplementedError()"
    ClearHiddenTests  hidden test blocks removed (the visible asserts stay)
    ClearOutput       outputs and execution counts removed

and nbconvert's TagRemovePreprocessor removes the instructors' key cells (model answers
of the written questions, tag `instructors-key`; see tools/classroom.py).

    python tools/student.py                 # every chapter -> student/
    python tools/student.py --out DIR 02    # only chapters whose name contains "02"

The result is deterministic (same input, same bytes) and replaces the output folder as a
whole, so a removed chapter does not linger. Instructors who grade with nbgrader use the
solution notebooks as their course's `source/` instead (see book/instructors.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import nbformat
from nbconvert.exporters import NotebookExporter
from nbconvert.preprocessors import TagRemovePreprocessor
from nbgrader.preprocessors import ClearHiddenTests, ClearOutput, ClearSolutions
from traitlets.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import classroom  # tools/classroom.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

README = """\
# Student notebooks (generated: do not edit)

Made by `make student` from the chapters in `notebooks/`: every exercise solution is
replaced by `raise NotImplementedError()` and hidden tests are removed. Fill in the cells
marked `# YOUR CODE HERE`, then run the test cell below each one; it prints
"Exercise N: correct" or says what is wrong. The last cell of each notebook lists the
exercises that passed: hand it in with the notebook.

Set-up: `pip install -e .` in the book's repository (or open a notebook on Colab: its
first cell installs the package). Chapters: {chapters}.
"""


def exporter() -> NotebookExporter:
    """nbconvert's notebook-to-notebook exporter with nbgrader's three preprocessors and
    the removal of the instructors' key cells."""
    config = Config()
    config.TagRemovePreprocessor.remove_cell_tags = {"instructors-key"}
    config.TagRemovePreprocessor.enabled = True
    config.NotebookExporter.preprocessors = [TagRemovePreprocessor, ClearSolutions,
                                             ClearHiddenTests, ClearOutput]
    return NotebookExporter(config=config)


def student_version(notebook: Path) -> str:
    """The student notebook, as the JSON text to write."""
    nb = nbformat.read(notebook, as_version=4)
    text, _ = exporter().from_notebook_node(nb, resources={"unique_key": notebook.stem})
    return text


def build(out: Path, names: list[str] | None = None) -> list[Path]:
    """Write the student notebooks (and a README) into `out`, replacing it; return the paths."""
    sources = classroom.chapters(NOTEBOOKS)
    if names:
        sources = [s for s in sources if any(n in s.stem for n in names)]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for source in sources:
        (tmp / source.name).write_text(student_version(source), encoding="utf-8")
    chapters = ", ".join(s.stem for s in sources) or "none"
    (tmp / "README.md").write_text(README.format(chapters=chapters), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return [out / s.name for s in sources]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="only chapters whose name contains one of these")
    parser.add_argument("--out", type=Path, default=ROOT / "student", help="output folder")
    args = parser.parse_args()
    written = build(args.out, args.names)
    for path in written:
        print(f"wrote {path.relative_to(path.parents[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
