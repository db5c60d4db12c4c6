"""Classroom assignments: the exercises' nbgrader markup and `make student` (tools/student.py).

- every chapter has >= 2 exercises: a solution cell followed by a locked graded test cell;
  at least one is a task (not a quick check); every question in words has a key;
- graded cells go through caption_lib.checks (no bare `assert`) and end with
  `checks.passed("Exercise N")`; the last cell's hand-in summary lists every exercise
  with the points of its metadata;
- the committed (solution) notebooks pass their own test cells;
- the student notebooks keep no solution code, no hidden tests and no instructors' key,
  and every exercise raises NotImplementedError (only the exercise section's imports,
  the solution cell and its test cell run: chapters themselves are never executed here,
  some train models);
- a planted wrong answer fails the chapter's own test cell with the check's message;
- `make student` gives the same bytes twice.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import classroom  # tools/classroom.py

NOTEBOOKS = classroom.chapters()
IDS = [p.stem for p in NOTEBOOKS]
MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")


def _student_tool():
    spec = importlib.util.spec_from_file_location("student_tool", ROOT / "tools" / "student.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "student"
    _student_tool().build(out)
    return out


def _nbgrader(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def _exercises(nb) -> list[tuple[int, int]]:
    """(solution cell index, graded test cell index) for every exercise of a notebook."""
    pairs = []
    for i, cell in enumerate(nb.cells):
        if _nbgrader(cell).get("solution") and cell.cell_type == "code":
            test = next(j for j in range(i + 1, len(nb.cells)) if _nbgrader(nb.cells[j]).get("grade"))
            pairs.append((i, test))
    return pairs


def _setup_namespace(nb) -> dict:
    """Run the exercise section's own imports (its code cells before the first exercise)."""
    namespace: dict = {"__name__": "__student__"}
    for cell in classroom.section(nb):
        if cell.cell_type != "code":
            continue
        if _nbgrader(cell):
            return namespace
        exec(compile(cell.source, "<setup>", "exec"), namespace)  # noqa: S102
    raise AssertionError("no exercise in the section")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_exercises_have_nbgrader_markup(path):
    nb = nbformat.read(path, as_version=4)
    pairs = _exercises(nb)
    assert len(pairs) >= 2, "at least two exercises per chapter"
    grade_ids = [_nbgrader(c)["grade_id"] for c in nb.cells if _nbgrader(c)]
    assert len(grade_ids) == len(set(grade_ids)), f"duplicate grade_id in {grade_ids}"
    for solution, test in pairs:
        assert "### BEGIN SOLUTION" in nb.cells[solution].source
        meta = _nbgrader(nb.cells[test])
        assert meta["locked"] and meta["points"] > 0 and not meta["solution"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_graded_cells_explain_through_checks_and_the_summary_lists_them(path):
    nb = nbformat.read(path, as_version=4)
    points = {}
    for cell in nb.cells:
        meta = _nbgrader(cell)
        if not (meta.get("grade") and cell.cell_type == "code"):
            continue
        tree = ast.parse(cell.source)
        bare = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert not bare, f"{meta['grade_id']}: bare assert on lines {bare}: use caption_lib.checks"
        assert "checks.check_" in cell.source, meta["grade_id"]
        number = int(re.match(r"ex(\d+)-test", meta["grade_id"]).group(1))
        assert cell.source.rstrip().endswith(f'checks.passed("Exercise {number}")'), meta["grade_id"]
        points[f"Exercise {number}"] = meta["points"]
    last = nb.cells[-1]
    assert last.cell_type == "code" and last.source.startswith("checks.summary(")
    assert ast.literal_eval(last.source[len("checks.summary("):-1]) == points


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_each_chapter_has_a_task_and_keys_for_its_questions(path):
    nb = nbformat.read(path, as_version=4)
    exercises = classroom.exercises(nb)
    assert [e.number for e in exercises] == list(range(1, len(exercises) + 1))
    assert {e.kind for e in exercises} <= {"task", "quick check", "written"}
    assert any(e.kind == "task" for e in exercises), "no exercise that needs thinking"
    for e in exercises:
        assert e.key or not e.question, f"exercise {e.number} asks a question but has no key"
        assert (e.grade_id is None) == (e.kind == "written"), e
    assert not any(classroom.is_key(c) and "remove-cell" not in c.metadata["tags"]
                   for c in nb.cells), "a key cell the book would show"
    # book/_ext/hide_answers.py clears code cells; a Markdown answer belongs in a key cell
    assert not any(_nbgrader(c).get("solution") for c in nb.cells if c.cell_type == "markdown")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_solution_notebook_passes_its_own_test_cells(path):
    nb = nbformat.read(path, as_version=4)
    graded = [c for c in nb.cells if _nbgrader(c).get("grade") and c.cell_type == "code"]
    assert graded
    for cell in graded:
        name = _nbgrader(cell)["grade_id"]
        assert cell.execution_count is not None, f"{name} was not executed"
        assert not any(o.output_type == "error" for o in cell.outputs), name
        printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert re.search(r"Exercise \d+: correct", printed), f"{name} printed {printed!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_student_notebook_has_no_solutions_hidden_tests_or_outputs(path, student_dir):
    source = nbformat.read(path, as_version=4)
    source.cells = [c for c in source.cells if not classroom.is_key(c)]
    student = nbformat.read(student_dir / path.name, as_version=4)
    assert len(student.cells) == len(source.cells)
    assert not any(classroom.is_key(c) for c in student.cells)
    for before, after in zip(source.cells, student.cells):
        assert not any(m in after.source for m in MARKERS), after.source[:80]
        if after.cell_type == "code":
            assert after.outputs == [] and after.execution_count is None
        if not _nbgrader(before):
            assert after.source == before.source
            continue
        kept = set(re.sub(r"### (BEGIN|END) \w+( \w+)?", "", before.source).splitlines())
        hidden = re.findall(r"### BEGIN (?:SOLUTION|HIDDEN TESTS)\n(.*?)### END", before.source,
                            flags=re.DOTALL)
        secret = {line for block in hidden for line in block.splitlines() if line.strip()}
        outside = set(re.sub(r"### BEGIN (?:SOLUTION|HIDDEN TESTS)\n.*?### END[^\n]*", "",
                             before.source, flags=re.DOTALL).splitlines())
        leaked = [line for line in after.source.splitlines() if line in secret - outside]
        assert not leaked, f"{_nbgrader(before)['grade_id']} keeps {leaked}"
        stub = {" " * n + line for n in (0, 4, 8)
                for line in ("# YOUR CODE HERE", "raise NotImplementedError()")}
        assert set(after.source.splitlines()) <= kept | stub


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_student_exercise_raises_not_implemented(path, student_dir, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(student_dir / path.name, as_version=4)
    namespace = _setup_namespace(nb)
    for solution, test in _exercises(nb):
        before = set(namespace)
        exec(compile(nb.cells[solution].source, "<solution>", "exec"), namespace)  # noqa: S102
        defined = [v for k, v in namespace.items() if k not in before and callable(v)]
        assert defined, nb.cells[solution].source
        for fn in defined:  # the stub raises whatever the arguments (classes: in the test)
            if isinstance(fn, type):
                continue
            nargs = fn.__code__.co_argcount - len(fn.__defaults__ or ())
            with pytest.raises(NotImplementedError):
                fn(*[None] * nargs)
        with pytest.raises(NotImplementedError):  # the graded cell fails on the stub
            exec(compile(nb.cells[test].source, "<test>", "exec"), dict(namespace))  # noqa: S102


def test_a_planted_wrong_answer_fails_the_chapter_test_cell_with_a_helpful_message(student_dir):
    nb = nbformat.read(student_dir / "02_encoder.ipynb", as_version=4)
    namespace = _setup_namespace(nb)
    solution, test = _exercises(nb)[0]
    source = nbformat.read(ROOT / "notebooks" / "02_encoder.ipynb", as_version=4)
    reference = next(c.source for c in source.cells
                     if _nbgrader(c).get("grade_id") == _nbgrader(nb.cells[solution])["grade_id"])
    wrong = reference.replace("m.momentum = None", "pass")  # keeps the exponential average
    exec(compile(wrong, "<solution>", "exec"), namespace)  # noqa: S102
    with pytest.raises(AssertionError, match=r"running_mean differs from the reference: .*every "
                                             r"batch must count equally \(momentum=None"):
        exec(compile(nb.cells[test].source, "<test>", "exec"), namespace)  # noqa: S102
    wrong = reference.replace("net.train(was_training)", "pass")  # leaves the network in train mode
    exec(compile(wrong, "<solution>", "exec"), namespace)  # noqa: S102
    with pytest.raises(AssertionError, match="must be back in eval mode afterwards"):
        exec(compile(nb.cells[test].source, "<test>", "exec"), namespace)  # noqa: S102


def test_make_student_is_reproducible_and_replaces_the_folder(student_dir, tmp_path):
    again = tmp_path / "student"
    again.mkdir()
    (again / "stale.ipynb").write_text("{}")
    _student_tool().build(again)
    first = sorted(p.name for p in student_dir.iterdir())
    assert first == sorted(p.name for p in again.iterdir())
    assert first == sorted([p.name for p in NOTEBOOKS] + ["README.md"])
    for name in first:
        assert (student_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_makefile_has_the_student_target():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^student: .*\n\t\$\(PY\) tools/student.py --out student$", makefile,
                     flags=re.MULTILINE)
    assert "student/" in (ROOT / ".gitignore").read_text().splitlines()
