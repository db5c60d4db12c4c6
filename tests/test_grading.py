"""Grading end to end: an nbgrader course from the chapters, three students, real scores.

`tools/course.py` makes a throw-away course (one assignment per chapter with exercises:
its exercise section, so nothing trains); `nbgrader generate_assignment` releases it;
three students hand in every chapter:

- `solved`: the release with the reference solutions filled in -> full marks;
- `untouched`: the release as given -> zero;
- `wrong`: solved except one planted mistake per chapter -> exactly that exercise's
  points missing, and its feedback says what is wrong in plain words.

`nbgrader autograde` runs each submission with the hidden tests restored and writes the
gradebook; the scores asserted are read from it. `nbgrader generate_feedback` writes an
HTML report per student. The Colab route is checked on the same runs: the set-up cell
that installs the package is there, and the last cell's hand-in summary lists every
exercise. Chapters are discovered, not listed: a new chapter with nbgrader cells is graded
too (a chapter without a planted mistake below leaves its first exercise unsolved).
Takes a few minutes (18 notebook runs for 6 chapters; each starts a kernel and imports
torch): 437 s on the shared 2-core machine, with other jobs running.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("nbgrader")
# nbgrader's gradebook warns about its own SQLAlchemy sessions; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SAWarning")


_tool = load_tool


course_tool = _tool("course")
classroom = _tool("classroom")

# chapter -> (solution cell, the planted mistake (old, new), a words of the feedback it gets)
WRONG = {
    "01_dataset": ("ex3-solution", ("y1 > r * cell", "y1 >= r * cell"), "covers cells"),
    "02_encoder": ("ex1-solution", ("m.momentum = None", "pass"), "every batch must count equally"),
    "03_attention": ("ex1-solution", (" / keys.size(2) ** 0.5", ""), "divide the scores by sqrt(A)"),
    "04_decoder": ("ex1-solution", ("i, f, g, o = gates", "i, f, o, g = gates"),
                   "the gates are in the order input, forget, output, cell"),
    "05_training": ("ex1-solution", ("(alphas * mask.unsqueeze(2))", "alphas"), "the padded steps count"),
    "06_inference": ("ex2-solution", ("bp = 1.0 if c > r else math.exp(1 - r / c)", "bp = 1.0"),
                     "brevity penalty"),
    "07_hard_attention": ("ex1-solution", (".to(p.dtype) - p  # (n, 2) grad log p_s",
                                           ".to(p.dtype)  # (n, 2) grad log p_s"),
                          "differs from the reference"),
}
STUDENTS = ("solved", "untouched", "wrong")


def _meta(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def _submission(source, release, student: str, chapter: str):
    """What `student` hands in for `chapter`: the release, with solutions as they did them."""
    nb = nbformat.from_dict(release)
    if student == "untouched":
        return nb
    solutions = {_meta(c)["grade_id"]: c.source for c in source.cells if _meta(c).get("solution")}
    wrong_id, (old, new), _ = WRONG.get(chapter, (None, ("", ""), ""))
    first = next(iter(solutions))
    for cell in nb.cells:
        grade_id = _meta(cell).get("grade_id")
        if grade_id not in solutions:
            continue
        if student == "wrong" and grade_id == wrong_id:
            assert old in solutions[grade_id], f"{chapter}: the planted mistake no longer applies"
            cell.source = solutions[grade_id].replace(old, new)
        elif not (student == "wrong" and wrong_id is None and grade_id == first):
            cell.source = solutions[grade_id]
    return nb


def _points(source) -> dict[str, int]:
    return {_meta(c)["grade_id"]: int(_meta(c)["points"]) for c in source.cells
            if _meta(c).get("grade")}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """The course after generate_assignment, autograde and generate_feedback for all."""
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

    course = tmp_path_factory.mktemp("course")
    # nbgrader runs `alembic` (the gradebook's migrations) from PATH: the venv's bin
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ["PATH"].split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ["PATH"]
    start = time.perf_counter()
    names = course_tool.build(course, timeout=300)
    config = Config()
    config.CourseDirectory.root = str(course)
    config.CourseDirectory.course_id = "show-attend-tell"
    config.CourseDirectory.db_url = f"sqlite:///{course / 'gradebook.db'}"
    config.Execute.timeout = 300
    api = NbGraderAPI(config=config)
    for name in names:
        result = api.generate_assignment(name)
        assert result["success"], result.get("error") or result.get("log")
        source = nbformat.read(course / "source" / name / f"{name}.ipynb", as_version=4)
        release = nbformat.read(course / "release" / name / f"{name}.ipynb", as_version=4)
        for student in STUDENTS:
            folder = course / "submitted" / student / name
            folder.mkdir(parents=True)
            nbformat.write(_submission(source, release, student, name), folder / f"{name}.ipynb")
            result = api.autograde(name, student)
            assert result["success"], result.get("error") or result.get("log")
        result = api.generate_feedback(name)
        assert result["success"], result.get("error") or result.get("log")
    seconds = time.perf_counter() - start
    print(f"\nnbgrader round trip: {len(names)} assignments x {len(STUDENTS)} students "
          f"in {seconds:.0f} s")
    return course, names, config


def test_every_chapter_with_exercises_is_an_assignment(graded):
    course, names, _ = graded
    assert names == [p.stem for p in classroom.chapters()] and len(names) >= 6
    for name in names:
        release = nbformat.read(course / "release" / name / f"{name}.ipynb", as_version=4)
        text = "\n".join(c.source for c in release.cells)
        assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text
        assert "instructors-key" not in str([c.metadata for c in release.cells])
        assert "google.colab" in release.cells[1].source, "the Colab set-up cell comes first"
        assert "checks.summary(" in release.cells[-1].source


def test_scores_from_the_gradebook(graded):
    from nbgrader.api import Gradebook

    course, names, config = graded
    with Gradebook(config.CourseDirectory.db_url) as gb:
        for name in names:
            source = nbformat.read(course / "source" / name / f"{name}.ipynb", as_version=4)
            points = _points(source)
            total = sum(points.values())
            subs = {s: gb.find_submission(name, s) for s in STUDENTS}
            assert subs["solved"].max_score == total
            assert subs["solved"].score == total, f"{name}: the solutions lose points"
            assert subs["untouched"].score == 0, f"{name}: stubs earn points"
            wrong_id = WRONG.get(name, (f"{next(iter(points))[:-5]}-solution",))[0]
            wrong_test = wrong_id.replace("-solution", "-test")
            assert subs["wrong"].score == total - points[wrong_test], name
            assert gb.find_grade(wrong_test, name, name, "wrong").score == 0


def test_feedback_is_html_and_explains_the_mistake(graded):
    course, names, _ = graded
    for name in names:
        for student in STUDENTS:
            html = (course / "feedback" / student / name / f"{name}.html").read_text()
            assert "<html" in html.lower() and "Score" in html
        if name in WRONG:
            html = (course / "feedback" / "wrong" / name / f"{name}.html").read_text()
            plain = re.sub(r"<[^>]+>", "", html).replace("&#39;", "'").replace("&quot;", '"')
            assert WRONG[name][2] in plain, f"{name}: {WRONG[name][2]!r} not in the feedback"


def test_the_hand_in_summary_lists_every_exercise(graded):
    course, names, _ = graded
    for name in names:
        for student in ("solved", "untouched"):
            nb = nbformat.read(course / "autograded" / student / name / f"{name}.ipynb",
                               as_version=4)
            printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
            exercises = [e for e in classroom.exercises(nb) if e.grade_id]
            for ex in exercises:
                state = "correct" if student == "solved" else "not yet"
                assert f"Exercise {ex.number} ({ex.points} points): {state}" in printed, printed
