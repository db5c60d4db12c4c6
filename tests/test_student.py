"""Classroom assignments: the exercises' nbgrader markup and `make student` (tools/student.py).

- every chapter has >= 2 exercises: a solution cell followed by a locked graded test cell;
- the committed (solution) notebooks pass their own test cells;
- the student notebooks keep no solution code and no hidden tests, and every exercise
  raises NotImplementedError (only the set-up, the solution cell and its test cell run:
  chapters themselves are never executed here, some train models);
- a planted wrong answer fails the chapter's own test cell with the check's message;
- `make student` gives the same bytes twice.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
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
    """Run the chapter's set-up, parameter and import cells (up to `import caption_lib`)."""
    namespace: dict = {"__name__": "__student__"}
    for cell in nb.cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, "<setup>", "exec"), namespace)  # noqa: S102
            if "import caption_lib" in cell.source:
                return namespace
    raise AssertionError("no cell imports caption_lib")


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
    student = nbformat.read(student_dir / path.name, as_version=4)
    assert len(student.cells) == len(source.cells)
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
        assert set(after.source.splitlines()) <= kept | {
            "    # YOUR CODE HERE", "    raise NotImplementedError()",
            "# YOUR CODE HERE", "raise NotImplementedError()"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_student_exercise_raises_not_implemented(path, student_dir, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(student_dir / path.name, as_version=4)
    namespace = _setup_namespace(nb)
    earlier = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for solution, test in _exercises(nb):
        before = set(namespace)
        exec(compile(nb.cells[solution].source, "<solution>", "exec"), namespace)  # noqa: S102
        defined = [v for k, v in namespace.items() if k not in before and callable(v)]
        assert defined, nb.cells[solution].source
        for fn in defined:  # the stub raises whatever the arguments
            nargs = fn.__code__.co_argcount - len(fn.__defaults__ or ())
            with pytest.raises(NotImplementedError):
                fn(*[None] * nargs)
        # the graded cell fails on the stub, or needs state computed earlier in the chapter
        try:
            exec(compile(nb.cells[test].source, "<test>", "exec"), dict(namespace))  # noqa: S102
        except NotImplementedError:
            continue
        except NameError as err:
            name = re.search(r"name '(\w+)' is not defined", str(err)).group(1)
            assert re.search(rf"^{name}\b.*=|, {name}\b.*=", earlier, flags=re.MULTILINE), err
        else:
            raise AssertionError(f"{_nbgrader(nb.cells[test])['grade_id']} passed on the stub")


def test_a_planted_wrong_answer_fails_the_chapter_test_cell_with_a_helpful_message(student_dir):
    nb = nbformat.read(student_dir / "02_encoder.ipynb", as_version=4)
    namespace = _setup_namespace(nb)
    solution, test = _exercises(nb)[0]
    wrong = nb.cells[solution].source.replace(
        "    # YOUR CODE HERE\n    raise NotImplementedError()",
        "    return fmap.reshape(fmap.size(0), -1, fmap.size(1))  # forgot the permute")
    exec(compile(wrong, "<solution>", "exec"), namespace)  # noqa: S102
    with pytest.raises(AssertionError, match="region r must be cell"):
        exec(compile(nb.cells[test].source, "<test>", "exec"), namespace)  # noqa: S102
    namespace["regions_from_map"] = lambda fmap: fmap.flatten(2)  # (B, C, H*W)
    with pytest.raises(AssertionError, match=re.escape("expected (3, 20, 8), got (3, 8, 20)")):
        exec(compile(nb.cells[test].source, "<test>", "exec"), namespace)  # noqa: S102
    check = "\n".join(line for line in nb.cells[test].source.splitlines()
                      if line.startswith("checks."))
    with pytest.raises(AssertionError, match=re.escape(
            "expected shape (B, 49, 2048) = (2, 49, 2048), got (2, 2048, 49) (the right sizes "
            "in the wrong order: check your permute/transpose)")):
        exec(compile(check, "<test>", "exec"), namespace)  # noqa: S102


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
