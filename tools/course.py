"""Make an nbgrader course from the chapters: one assignment per chapter, its exercises.

    python tools/course.py COURSE_DIR            # every chapter with exercises
    python tools/course.py COURSE_DIR 02 04      # only chapters whose name contains 02 or 04

writes `COURSE_DIR/source/NN_name/NN_name.ipynb` and `COURSE_DIR/nbgrader_config.py`.
Each assignment is the chapter's exercise section on its own (tools/classroom.py): a
title, the chapter's set-up cell (it installs the package on Colab), the exercises'
imports, the exercises with their solutions and hidden tests, and the hand-in summary;
the instructors' key cells are left out. Autograding then runs the exercises only, in
seconds per student, and never trains a model. Afterwards, inside COURSE_DIR:

    nbgrader generate_assignment 02_encoder   # release/: solutions and hidden tests removed
    nbgrader autograde 02_encoder             # submitted/<student>/02_encoder/ -> autograded/
    nbgrader generate_feedback 02_encoder     # feedback/<student>/02_encoder/*.html

(see book/instructors.md; tests/test_grading.py runs the whole round trip).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import classroom  # tools/classroom.py, next to this script

CONFIG = '''\
c = get_config()  # noqa: F821 (nbgrader's config files get it from traitlets)
c.CourseDirectory.course_id = {course_id!r}
c.CourseDirectory.db_url = "sqlite:///" + __file__.rsplit("/", 1)[0] + "/gradebook.db"
c.Execute.timeout = {timeout}  # seconds per cell
'''


def build(course: Path, names: list[str] | None = None, course_id: str = "show-attend-tell",
          timeout: int = 600) -> list[str]:
    """Write the course's source/ and nbgrader_config.py; return the assignment names."""
    written = []
    for path in classroom.chapters():
        if names and not any(n in path.stem for n in names):
            continue
        nb = nbformat.read(path, as_version=4)
        folder = course / "source" / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        nbformat.write(classroom.assignment(nb, path.stem), folder / path.name)
        written.append(path.stem)
    course.mkdir(parents=True, exist_ok=True)
    (course / "nbgrader_config.py").write_text(CONFIG.format(course_id=course_id, timeout=timeout))
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("course", type=Path, help="the course folder to write into")
    parser.add_argument("names", nargs="*", help="only chapters whose name contains one of these")
    args = parser.parse_args()
    for name in build(args.course, args.names):
        print(f"wrote {args.course / 'source' / name / (name + '.ipynb')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
