"""The book types no measured number into prose (tools/prose_numbers.py), and the check
itself catches what it should: planted faults on a throw-away book."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("prose_numbers", ROOT / "tools" / "prose_numbers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("prose_numbers", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _book(tmp_path: Path, prose: str, allow: str = "[]") -> Path:
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "book").mkdir()
    (tmp_path / "notebooks" / "01_x.py").write_text(
        "# %% [markdown]\n" + "".join(f"# {line}\n" for line in prose.splitlines())
        + "\n# %%\nprint(0.123, '45 s')\n")
    (tmp_path / "book" / "prose_numbers_allow.yml").write_text(allow)
    return tmp_path


def test_the_book_types_no_measured_number_into_prose():
    bad, stale = _tool().check(ROOT)
    assert not bad, "\n".join(map(str, bad))
    assert not stale, f"allow-list entries that match nothing: {stale}"


@pytest.mark.parametrize("sentence, kind", [
    ("The run took 677 s on this machine.", "duration"),
    ("It reached a semantic F1 of 0.76 after training.", "decimal"),
    ("Only 38 % of the attention falls on the object.", "percentage"),
    ("The decoder is 2.15× faster than the tutorial's.", "decimal"),
    ("It is 9× faster than the tutorial's.", "ratio"),
    ("The mean magnitude is ≈ 18 at layer4.", "approximation"),
    ("BLEU-4 82 is not comparable with the paper.", "score"),
])
def test_a_planted_number_is_found_with_its_line(tmp_path, sentence, kind):
    root = _book(tmp_path, f"Intro line.\n{sentence}")
    bad, _ = _tool().check(root)
    assert [(f.file, f.line, f.kind) for f in bad][:1] == [("notebooks/01_x.py", 3, kind)]
    assert "print or glue it" in str(bad[0])


def test_code_maths_glue_and_structure_are_not_prose(tmp_path):
    prose = ("A 224×224 image becomes 7×7 = 49 regions of 2048 values (2015, eq. 4).\n"
             "The paper's Sec. 4.2 and eq. 11–12, Table 1, version v1.0.\n"
             "Glued: {glue:text}`f1:.3f` and `lr=0.0004` in code and $\\lambda = 0.02$.\n"
             "See [the file](results/x_1.5.json) and {cite:p}`xu2015show`.")
    bad, _ = _tool().check(_book(tmp_path, prose))
    assert bad == []


def test_the_allow_list_needs_a_reason_and_reports_stale_entries(tmp_path):
    root = _book(tmp_path, "Dropout 0.5 as in the paper.",
                 "- {file: notebooks/01_x.py, text: 'Dropout 0.5', reason: the paper's setting}\n"
                 "- {file: notebooks/01_x.py, text: 'gone 1.5', reason: was here once}\n")
    bad, stale = _tool().check(root)
    assert bad == [] and [s["text"] for s in stale] == ["gone 1.5"]
    (root / "book" / "prose_numbers_allow.yml").write_text(
        "- {file: notebooks/01_x.py, text: 'Dropout 0.5', reason: ''}\n")
    with pytest.raises(ValueError, match="entry 1: needs file, text and a reason"):
        _tool().check(root)
