"""Open every page of the built book in headless Chromium and check what readers see.

    python tools/check_book.py --site _build/html --toc _toc.yml --screenshots _build/screenshots

The site is served from a loopback HTTP server; every request that leaves it is blocked
(the book must work offline, MathJax included). For each page of `_toc.yml` the check
asserts:

- the page loads (HTTP 200), has a `<title>` and exactly one `<h1>`, which the title names;
- every image loaded (no broken `<img>`) and has alt text other than its file name; no
  request failed;
- maths rendered: every `.math` element holds MathJax output (`mjx-container`), no MathJax
  error, and no raw `\\(`, `\\[`, `$$` or `\\begin{` left in the text readers see;
- no Markdown table left as text (`| a | b |` and `|---|`);
- no JavaScript error (uncaught exception or `console.error`);
- chapter pages (the toc's numbered parts) have the Colab launch button and end with the
  headings "Summary" and "Exercises";
- the "next" link of each page leads to the following page of the toc, from the first
  page to the last;
- no answer is given away: no nbgrader marker (`### BEGIN SOLUTION`, `### BEGIN HIDDEN
  TESTS`, ...) in any notebook cell of any page, and no line of a reference solution, a
  hidden test or an instructors' key (read from the page's notebook, see
  tools/classroom.py) anywhere in a page's text, shown or collapsed; the same for the
  notebooks of `_sources/` (the pages' download button).

A full-page screenshot of each page is saved under `--screenshots`. Exit status 1 with
one line per problem (`page: problem`); 2 when the browser cannot run at all.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import itertools
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import classroom  # tools/classroom.py

DEFAULT_CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 900}
CHAPTER_HEADINGS = ("Summary", "Exercises")

# Runs in the page after `load`: waits for images and MathJax, then reports what a
# reader would see. Returns a plain object (see `_problems`).
INSPECT_JS = r"""
async () => {
  for (const img of document.images) img.loading = "eager";
  await Promise.allSettled(Array.from(document.images).map(img => img.decode()));
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const text = el => {
    const copy = el.cloneNode(true);
    copy.querySelectorAll(".headerlink, .section-number").forEach(a => a.remove());
    return copy.textContent.replace(/\s+/g, " ").trim();
  };
  const skip = "pre, code, script, style, textarea, mjx-container, .highlight";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const raw = [], tables = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement && node.parentElement.closest(skip)) continue;
    const line = node.textContent.trim().slice(0, 60);
    if (/\\\(|\\\[|\$\$|\\begin\{/.test(node.textContent)) raw.push(line);
    if (/\|\s*(-{3,}|—)\s*\|/.test(node.textContent)) tables.push(line);
  }
  const maths = Array.from(document.querySelectorAll(".math"));
  const next = document.querySelector("a.right-next");
  return {
    title: document.title.trim(),
    h1: Array.from(document.querySelectorAll("h1")).filter(h => h.checkVisibility()).map(text),
    h2: Array.from(document.querySelectorAll("h2")).map(text),
    broken: Array.from(document.images)
      .filter(img => !img.complete || img.naturalWidth === 0)
      .map(img => img.getAttribute("src")),
    no_alt: Array.from(document.images)  // no alt, or only the file's name (myst-nb's default)
      .filter(img => /^$|\.(png|jpe?g|gif|svg|webp)$/i.test((img.getAttribute("alt") || "").trim()))
      .map(img => img.getAttribute("src")),
    maths: maths.length,
    unrendered: maths.filter(el => !el.querySelector("mjx-container")).length,
    math_errors: Array.from(document.querySelectorAll("mjx-merror"))
      .map(el => (el.getAttribute("data-mjx-error") || el.textContent).slice(0, 80)),
    raw_math: raw,
    raw_tables: tables,
    colab: document.querySelectorAll('a[href^="https://colab.research.google.com"]').length,
    next: next ? next.href : null,
  };
}
"""


@dataclass(frozen=True)
class Page:
    """One page of the book: its path in the built site and whether it is a chapter."""

    path: str
    chapter: bool


def toc_pages(toc: Path) -> list[Page]:
    """The pages of a Jupyter Book `_toc.yml` in reading order (numbered parts = chapters)."""
    spec = yaml.safe_load(toc.read_text())
    pages = [Page(f"{spec['root']}.html", chapter=False)]
    for part in spec.get("parts", []):
        for entry in part["chapters"]:
            pages.append(Page(f"{entry['file']}.html", chapter=bool(part.get("numbered"))))
    return pages


def answer_secrets(toc: Path, pages: list[Page]) -> dict[str, list[str]]:
    """For each page made from a notebook with exercises: the lines it must not show."""
    import nbformat

    out = {}
    for page in pages:
        source = toc.parent / Path(page.path).with_suffix(".ipynb")
        if source.is_file():
            nb = nbformat.read(source, as_version=4)
            if any(classroom.nbgrader_meta(c) or classroom.is_key(c) for c in nb.cells):
                out[page.path] = classroom.secrets(nb)
    return out


def answer_problems(text: str, cell_text: str, secrets: list[str]) -> list[str]:
    """What gives an answer away: `text` is all of a page's text (shown or collapsed),
    `cell_text` that of its notebook cells."""
    out = [f"nbgrader marker visible: {m!r}" for m in classroom.MARKERS if m in cell_text]
    lines = {classroom.normalise(line) for line in text.splitlines()}
    shown = [s for s in secrets if classroom.normalise(s) in lines]
    if shown:
        out.append(f"answer visible ({len(shown)} lines of solutions, hidden tests or keys), "
                   f"e.g. {shown[0]!r}")
    return out


class _Text(HTMLParser):
    """All text of an HTML page, and that of its notebook cells (`div.cell`)."""

    def __init__(self):
        super().__init__()
        self.text: list[str] = []
        self.cells: list[str] = []
        self._stack: list[bool] = []  # per open div: inside a cell?
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        if tag == "div":
            classes = (dict(attrs).get("class") or "").split()
            self._stack.append(bool(self._stack and self._stack[-1]) or "cell" in classes)

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1
        if tag == "div" and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        if self._stack and self._stack[-1]:
            self.cells.append(data)


def html_answer_problems(site: Path, secrets: dict[str, list[str]]) -> list[str]:
    """`answer_problems` on the HTML files themselves (no browser): every page of `secrets`."""
    out = []
    for path, lines in secrets.items():
        parser = _Text()
        parser.feed((site / path).read_text(encoding="utf-8"))
        text, cells = "".join(parser.text), "".join(parser.cells)
        out += [f"{path}: {p}" for p in answer_problems(text, cells, lines)]
    return out + download_problems(site, secrets)


def download_problems(site: Path, secrets: dict[str, list[str]]) -> list[str]:
    """The notebooks behind the download button (`_sources/`) must not hold answers."""
    import nbformat

    out = []
    for path, lines in secrets.items():
        base = site / "_sources" / Path(path).with_suffix(".ipynb")
        for source in (base, base.with_name(base.name + ".txt")):
            if not source.is_file():
                continue
            nb = nbformat.read(source, as_version=4)
            cells = "\n".join(c.source for c in nb.cells)
            out += [f"{path}: download (_sources): {p}"
                    for p in answer_problems(cells, cells, lines)]
    return out


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium to drive: `explicit` if given, else Debian's or one on PATH (or None)."""
    candidates = [explicit] if explicit else [DEFAULT_CHROMIUM, shutil.which("chromium"),
                                              shutil.which("chromium-browser")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


@contextlib.contextmanager
def serve(site: Path):
    """Serve `site` on a free loopback port; yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per request would drown the report
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _problems(page: Page, seen: dict) -> list[str]:
    """Turn what `INSPECT_JS` saw on `page` into one message per problem."""
    out = []
    if not seen["title"]:
        out.append("no <title>")
    if len(seen["h1"]) != 1:
        out.append(f"expected one <h1> heading, found {len(seen['h1'])}")
    elif seen["h1"][0] not in seen["title"]:
        out.append(f"title {seen['title']!r} does not name the heading {seen['h1'][0]!r}")
    out += [f"image did not load: {src}" for src in seen["broken"]]
    out += [f"image without alt text: {src}" for src in seen["no_alt"]]
    if seen["unrendered"]:
        out.append(f"maths not rendered: {seen['unrendered']} of {seen['maths']} formulas")
    out += [f"MathJax error: {msg}" for msg in seen["math_errors"]]
    out += [f"raw maths in the text: {text!r}" for text in seen["raw_math"]]
    out += [f"raw Markdown table in the text: {text!r}" for text in seen["raw_tables"]]
    if page.chapter:
        if not seen["colab"]:
            out.append("no Colab launch button")
        headings = [h for h in seen["h2"] if h in CHAPTER_HEADINGS]
        if headings[-2:] != list(CHAPTER_HEADINGS):
            out.append("does not end with the sections 'Summary' and 'Exercises'")
    return out


# a tqdm progress bar as a cell's stderr leaves it in the page: "epoch 1:  40%|####  | 4/10 ["
PROGRESS_BAR = re.compile(r"\d{1,3}%\|[^|\n]{0,80}\|\s*\d+/\d+\s*\[")


def progress_problems(cell_text: str) -> list[str]:
    """One message for the first progress bar left in the cells' output (the published page should
    show results, not the bars that led to them: pass `progress=False` in the chapter)."""
    bar = PROGRESS_BAR.search(cell_text)
    return [f"progress bar in a cell's output: {bar.group(0)!r}"] if bar else []


# textContent runs adjacent blocks together ("...C)Summary"), so the text of each block
# element is added on lines of its own; collapsed blocks are included (textContent, not
# innerText)
TEXT_JS = r"""() => [document.body.textContent + '\n' +
  Array.from(document.querySelectorAll('pre, p, li, td, th, summary, h1, h2, h3, h4'))
    .map(e => e.textContent).join('\n'),
  Array.from(document.querySelectorAll('div.cell')).map(e => e.textContent).join('\n')]"""


def check_site(site: Path, pages: list[Page], screenshots: Path | None,
               chromium: str, timeout_s: float = 60.0,
               secrets: dict[str, list[str]] | None = None) -> list[str]:
    """Check `pages` of the built `site` in headless Chromium; one line per problem.

    `secrets`: page path -> lines of answers it must not show (`answer_secrets`).
    """
    secrets = secrets or {}
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    failures: list[str] = []
    nexts: dict[str, str | None] = {}
    with serve(site) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(timeout_s * 1000)
        for page_spec in pages:
            url = urljoin(base, page_spec.path)
            problems: list[str] = []
            page = context.new_page()
            _listen(page, base, problems)
            try:
                response = page.goto(url, wait_until="load")
                if response is None or response.status != 200:
                    status = response.status if response else "no response"
                    failures.append(f"{page_spec.path}: page did not load ({status})")
                    page.close()
                    continue
                seen = page.evaluate(INSPECT_JS)
                problems += _problems(page_spec, seen)
                text, cell_text = page.evaluate(TEXT_JS)
                problems += answer_problems(text, cell_text, secrets.get(page_spec.path, []))
                problems += progress_problems(cell_text)
                nexts[page_spec.path] = seen["next"] and seen["next"].removeprefix(base)
                if screenshots is not None:
                    shot = screenshots / Path(page_spec.path).with_suffix(".png")
                    shot.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(shot), full_page=True)
            except PlaywrightError as error:  # a timeout or a crashed page: a failure, not a crash
                problems.append(f"could not check the page: {str(error).splitlines()[0]}")
            failures += [f"{page_spec.path}: {p}" for p in dict.fromkeys(problems)]
            page.close()
        browser.close()
    failures += _navigation([p.path for p in pages], nexts)
    failures += download_problems(site, secrets)
    return failures


def _listen(page, base: str, problems: list[str]) -> None:
    """Record into `problems` what goes wrong while `page` loads and runs."""

    def on_console(message):
        # a failed load is reported once, by on_response or the offline route
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(f"console error: {message.text}")

    def on_response(response):
        if response.status >= 400:
            problems.append(f"HTTP {response.status} for {response.url.removeprefix(base)}")

    page.route("**/*", _offline(urlsplit(base).netloc, problems))
    page.on("pageerror", lambda error: problems.append(f"JavaScript error: {error}"))
    page.on("console", on_console)
    page.on("response", on_response)


def _offline(local: str, problems: list[str]):
    """A route handler that lets requests to the book's server through and blocks others."""

    def route(r):
        url = r.request.url
        if url.startswith("data:") or urlsplit(url).netloc == local:
            r.continue_()
        else:
            problems.append(f"request outside the book (offline): {url}")
            r.abort()

    return route


def _navigation(order: list[str], nexts: dict[str, str | None]) -> list[str]:
    """The 'next' link of every page must lead to the following page of `order`."""
    out = []
    for here, want in itertools.pairwise(order):
        if here not in nexts:
            continue
        got = (nexts[here] or "").split("#")[0]
        if got != want:
            out.append(f"{here}: 'next' leads to {got or 'nowhere'}, expected {want}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site", type=Path, default=Path("_build/html"), help="the built book")
    parser.add_argument("--toc", type=Path, default=Path("_toc.yml"), help="its table of contents")
    parser.add_argument("--screenshots", type=Path, default=Path("_build/screenshots"))
    parser.add_argument("--chromium", default=None, help=f"browser (default {DEFAULT_CHROMIUM})")
    parser.add_argument("--answers-only", action="store_true",
                        help="only check that no page or download gives an answer away, "
                             "on the HTML files (no browser)")
    args = parser.parse_args(argv)
    if args.answers_only:
        pages = toc_pages(args.toc)
        failures = html_answer_problems(args.site, answer_secrets(args.toc, pages))
        for line in failures:
            print(line)
        print(f"check_book --answers-only: {len(pages)} pages, {len(failures)} problems")
        return 1 if failures else 0

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(f"check_book: no Chromium at {args.chromium or DEFAULT_CHROMIUM} "
              "(`make browser` installs Debian's)", file=sys.stderr)
        return 2
    if not (args.site / "index.html").is_file():
        print(f"check_book: {args.site}/index.html missing: build the book first (make book)",
              file=sys.stderr)
        return 2
    pages = toc_pages(args.toc)
    start = time.perf_counter()
    failures = check_site(args.site, pages, args.screenshots, chromium,
                          secrets=answer_secrets(args.toc, pages))
    for line in failures:
        print(line)
    print(f"check_book: {len(pages)} pages, {len(failures)} problems, screenshots in "
          f"{args.screenshots}/ ({time.perf_counter() - start:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
