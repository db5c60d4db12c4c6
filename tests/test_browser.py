"""tools/check_book.py, the browser check of the built book, on tiny planted sites.

Each fixture site is a few hand-written HTML pages with a `_toc.yml`, shaped like the
book's pages (an `<h1>`, `.math` elements, a Colab link, a `right-next` link); one page
carries a planted fault and the check must name that page and that fault, while the good
site passes. The pages load the book's own MathJax (`make mathjax`), as the book does.
The tests skip, saying why, where headless Chromium or Playwright is missing.
"""

from __future__ import annotations

import base64
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATHJAX = ROOT / "_vendor" / "mathjax"
# a 1x1 PNG
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def _tool():
    spec = importlib.util.spec_from_file_location("check_book", ROOT / "tools" / "check_book.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


check_book = _tool()


@pytest.fixture(scope="module")
def chromium() -> str:
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("browser tests need the playwright package (pip install -e '.[test]')")
    found = check_book.find_chromium()
    if found is None:
        pytest.skip(f"browser tests need Chromium at {check_book.DEFAULT_CHROMIUM} "
                    "(`make browser` installs Debian's): not found")
    if not (MATHJAX / "tex-mml-chtml.js").is_file():
        pytest.skip("browser tests need the book's MathJax in _vendor/mathjax (`make mathjax`)")
    return found


def _page(title: str, body: str, next_page: str | None, chapter: bool = True,
          mathjax: str = "_static/mathjax/tex-mml-chtml.js") -> str:
    colab = '<a href="https://colab.research.google.com/github/x/y/blob/main/p.ipynb">Colab</a>'
    nxt = f'<a class="right-next" href="{next_page}">next</a>' if next_page else ""
    ending = "<h2>Summary</h2><p>Done.</p><h2>Exercises</h2><p>Try.</p>" if chapter else ""
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title} — Book</title>
<script>window.MathJax = {{"options": {{"processHtmlClass": "tex2jax_process|math"}}}}</script>
<script defer src="{mathjax}"></script></head>
<body>{colab if chapter else ""}<h1>{title}<a class="headerlink" href="#">#</a></h1>
{body}{ending}{nxt}</body></html>"""


GOOD = """<p>Attention weights <span class="math notranslate nohighlight">\\(\\alpha_{ti}\\)</span>
sum to one:</p><div class="math notranslate nohighlight">\\[\\sum_i \\alpha_{ti} = 1\\]</div>
<figure><img src="figure.png" alt="a one-pixel figure"><figcaption>A figure.</figcaption></figure>
<pre>code keeps \\[ and $$ as they are</pre>"""

# a line of a reference solution: the chapter page must not show it (answer_secrets)
SOLUTION = "return fmap.permute(0, 2, 3, 1).reshape(B, H * W, C)"
SECRETS = {"02_chapter.html": [SOLUTION]}

FAULTS = {
    "missing figure": (GOOD.replace('src="figure.png"', 'src="missing.png"'),
                       ["image did not load: missing.png", "HTTP 404 for missing.png"]),
    "raw $$ maths": (GOOD + '<p class="mathjax_ignore">$$ L = -\\log p $$</p>',
                     ["raw maths in the text: '$$ L = -\\\\log p $$'"]),
    "unbalanced TeX": (GOOD.replace("\\alpha_{ti}\\)", "\\alpha_{ti\\)", 1),
                       ["maths not rendered: 1 of 2 formulas",
                        "raw maths in the text: '\\\\(\\\\alpha_{ti\\\\)'"]),
    "TeX error": (GOOD.replace("\\alpha_{ti}\\)", "\\frac{\\alpha}\\)", 1),
                  ["MathJax error: Missing argument for \\frac"]),
    "raw Markdown table": (GOOD + "<p>| epoch | loss |\n|---|---|\n| 1 | 2.3 |</p>",
                           ["raw Markdown table in the text: '| epoch | loss |\\n|---|---|\\n| 1 | 2.3 |'"]),
    "JavaScript error": (GOOD + "<script>undefinedFunction();</script>",
                         ["JavaScript error: undefinedFunction is not defined"]),
    "no alt text": (GOOD.replace(' alt="a one-pixel figure"', ""), ["image without alt text: figure.png"]),
    "file name as alt text": (GOOD.replace('alt="a one-pixel figure"', 'alt="../_images/figure.png"'),
                              ["image without alt text: figure.png"]),
    "request outside the book": (GOOD + '<img src="https://example.org/x.png" alt="remote">',
                                 ["request outside the book (offline): https://example.org/x.png"]),
    "visible solution": (GOOD + f'<div class="cell"><pre>def regions(fmap):\n    {SOLUTION}</pre></div>',
                         [f"answer visible (1 lines of solutions, hidden tests or keys), e.g. {SOLUTION!r}"]),
    "collapsed solution": (GOOD + f"<details><summary>show a solution</summary><pre>{SOLUTION}</pre></details>",
                           [f"answer visible (1 lines of solutions, hidden tests or keys), e.g. {SOLUTION!r}"]),
    "hidden test marker": (GOOD + '<div class="cell"><pre>### BEGIN HIDDEN TESTS\nf(2)</pre></div>',
                           ["nbgrader marker visible: '### BEGIN HIDDEN TESTS'"]),
}


def _site(folder: Path, chapter_body: str, **page) -> Path:
    """intro -> 01_good -> 02_chapter (with `chapter_body`), as a book with a numbered part."""
    site = folder / "html"
    (site / "_static").mkdir(parents=True)
    shutil.copytree(MATHJAX, site / "_static" / "mathjax")
    (site / "figure.png").write_bytes(PIXEL)
    (site / "index.html").write_text('<meta http-equiv="refresh" content="0; url=intro.html">')
    (site / "intro.html").write_text(_page("Intro", "<p>Welcome.</p>", "01_good.html", chapter=False))
    (site / "01_good.html").write_text(_page("1. Good", GOOD, "02_chapter.html"))
    (site / "02_chapter.html").write_text(_page("2. Chapter", chapter_body, None, **page))
    (folder / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nparts:\n  - caption: Book\n    numbered: true\n"
        "    chapters:\n      - file: 01_good\n      - file: 02_chapter\n")
    return site


def _check(folder: Path, chromium: str, body: str, **page) -> list[str]:
    site = _site(folder, body, **page)
    pages = check_book.toc_pages(folder / "_toc.yml")
    return check_book.check_site(site, pages, folder / "shots", chromium, timeout_s=30,
                                 secrets=SECRETS)


def test_the_book_pages_with_exercises_have_their_answers_as_secrets():
    pages = check_book.toc_pages(ROOT / "_toc.yml")
    secrets = check_book.answer_secrets(ROOT / "_toc.yml", pages)
    chapters = [p.path for p in pages if p.chapter]
    assert set(chapters) <= set(secrets) and all(len(secrets[c]) >= 5 for c in chapters)
    assert "book/intro.html" not in secrets


def test_toc_pages_lists_the_book_in_reading_order():
    pages = check_book.toc_pages(ROOT / "_toc.yml")
    assert pages[0] == check_book.Page("book/intro.html", chapter=False)
    chapters = [p.path for p in pages if p.chapter]
    assert chapters[0] == "notebooks/01_dataset.html" and len(chapters) >= 6


def test_without_chromium_the_command_says_why_in_one_line(tmp_path, capsys):
    code = check_book.main(["--site", str(tmp_path), "--chromium", str(tmp_path / "chromium")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"check_book: no Chromium at {tmp_path / 'chromium'} (`make browser` installs Debian's)"]


def test_a_good_site_passes_and_every_page_has_a_screenshot(tmp_path, chromium):
    assert _check(tmp_path, chromium, GOOD) == []
    shots = sorted(p.name for p in (tmp_path / "shots").iterdir())
    assert shots == ["01_good.png", "02_chapter.png", "intro.png"]
    assert all((tmp_path / "shots" / s).stat().st_size > 1000 for s in shots)


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
def test_a_planted_fault_is_reported_on_its_page(tmp_path, chromium, fault):
    body, expected = FAULTS[fault]
    failures = _check(tmp_path, chromium, body)
    for message in expected:
        assert f"02_chapter.html: {message}" in failures, failures
    assert not [f for f in failures if not f.startswith("02_chapter.html: ")], failures


def test_maths_without_mathjax_is_reported_raw(tmp_path, chromium):
    """What readers of an offline build saw when MathJax came from a CDN."""
    failures = _check(tmp_path, chromium, GOOD, mathjax="https://cdn.example.org/tex-mml-chtml.js")
    assert failures == [
        "02_chapter.html: request outside the book (offline): https://cdn.example.org/tex-mml-chtml.js",
        "02_chapter.html: maths not rendered: 2 of 2 formulas",
        "02_chapter.html: raw maths in the text: '\\\\(\\\\alpha_{ti}\\\\)'",
        "02_chapter.html: raw maths in the text: '\\\\[\\\\sum_i \\\\alpha_{ti} = 1\\\\]'",
    ]


def test_chapter_structure_and_navigation_faults_are_reported(tmp_path, chromium):
    site = _site(tmp_path, GOOD)
    page = (site / "02_chapter.html").read_text()
    (site / "02_chapter.html").write_text(
        page.replace("https://colab.research.google.com", "https://example.org")
        .replace("<h2>Exercises</h2>", "<h2>More</h2>"))
    intro = (site / "intro.html").read_text()
    (site / "intro.html").write_text(intro.replace('href="01_good.html"', 'href="02_chapter.html"'))
    pages = check_book.toc_pages(tmp_path / "_toc.yml")
    failures = check_book.check_site(site, pages, None, chromium, timeout_s=30)
    assert failures == [
        "02_chapter.html: no Colab launch button",
        "02_chapter.html: does not end with the sections 'Summary' and 'Exercises'",
        "intro.html: 'next' leads to 02_chapter.html, expected 01_good.html",
    ]


def test_a_page_that_does_not_exist_is_reported(tmp_path, chromium):
    site = _site(tmp_path, GOOD)
    (site / "02_chapter.html").unlink()
    failures = check_book.check_site(site, check_book.toc_pages(tmp_path / "_toc.yml"), None,
                                     chromium, timeout_s=30)
    assert "02_chapter.html: page did not load (404)" in failures


def test_the_command_line_fails_with_one_line_per_problem(tmp_path, chromium, capsys):
    site = _site(tmp_path, FAULTS["missing figure"][0])
    code = check_book.main(["--site", str(site), "--toc", str(tmp_path / "_toc.yml"),
                            "--screenshots", str(tmp_path / "shots"), "--chromium", chromium])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[:2] == ["02_chapter.html: HTTP 404 for missing.png",
                       "02_chapter.html: image did not load: missing.png"]
    assert out[-1].startswith("check_book: 3 pages, 2 problems")
