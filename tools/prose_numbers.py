"""Find measured-looking numbers typed into the book's prose.

The book's rule: a measured figure in a sentence is printed by the cell beside it or glued
from it (MyST-NB `{glue:text}` roles), or it is not there. This tool reads the prose the
reader sees — the Markdown cells of `notebooks/*.py` and the pages `book/*.md` — with code,
maths, glue roles, links and citations taken out, and reports every number that looks
measured: a decimal (`0.76`), a percentage (`38%`), a duration (`677 s`, `5 minutes`), a
ratio (`2.15×`), an approximation (`≈ 18`) or a score (`BLEU-4 82`).

Structural constants (224, 7×7, 49, 2048, years, equation numbers) do not look measured and
pass. The rest must be on the allow-list `book/prose_numbers_allow.yml`, one short entry
per number with the reason it is not a measurement (a constant of the paper, a setting of
the recipe, the paper's own published figure …):

    - file: notebooks/02_encoder.py
      text: "0.485"
      reason: ImageNet normalisation mean, a constant of torchvision

    python tools/prose_numbers.py          # exit 1 and one line per finding
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ALLOW = ROOT / "book" / "prose_numbers_allow.yml"

# what a measured figure looks like in a sentence
_NUM = r"\d+(?:[.,]\d+)*"
PATTERNS = {
    "decimal": re.compile(r"(?<![\w.])\d+\.\d+(?![\w.]*\d)"),
    "percentage": re.compile(rf"(?<![\w.]){_NUM}\s?(?:%|percent\b)"),
    "duration": re.compile(rf"(?<![\w.]){_NUM}\s?(?:ms|s|sec|seconds?|min|minutes?|h|hours?)\b"),
    "ratio": re.compile(rf"(?<![\w.×]){_NUM}\s?×(?!\s?\d)"),
    "approximation": re.compile(rf"(?:≈|~|about|around|roughly|nearly)\s?{_NUM}"),
    "score": re.compile(rf"(?:BLEU(?:-[1-4])?|CIDEr|METEOR|ROUGE-L|F1|grounding)"
                        rf"\s?(?:of|=|≈|:|is|was|at|reaches|reached)?\s?{_NUM}"),
}

# what the reader does not read as prose: removed before matching (order matters)
_STRIP = [
    re.compile(r"```.*?```", re.DOTALL),                 # fenced code / directives
    re.compile(r":::.*?:::", re.DOTALL),                  # colon fences
    re.compile(r"\$\$.*?\$\$", re.DOTALL),                # display maths
    re.compile(r"\$[^$\n]+\$"),                       # inline maths
    re.compile(r"\{[a-z:-]+\}`[^`]*`"),              # roles: {glue:text}`x`, {cite:p}`k`, {eq}`e`
    re.compile(r"`[^`\n]*`"),                         # inline code
    re.compile(r"\]\([^)]*\)"),                        # link targets
    re.compile(r"https?://\S+"),                      # bare URLs
    re.compile(r"<!--.*?-->", re.DOTALL),                  # comments
    re.compile(r"\(eq-[\w-]+\)"),                     # equation labels
    re.compile(r"(?:Secs?\.|Sections?|[Ee]qs?\.|Table|Fig\.|Figure|Chapter|chapter|v)\s?"
               r"\d+(?:\.\d+)*(?:\s?[–-]\s?\d+(?:\.\d+)*)?"),  # "Sec. 4.2", "eq. 11–12"
]


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    kind: str
    text: str
    sentence: str

    def __str__(self) -> str:
        return (f"{self.file}:{self.line}: {self.kind} {self.text!r} typed in prose: print or "
                f"glue it, or allow it with a reason ({self.sentence.strip()[:90]!r})")


def prose_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each prose block of a chapter script or a page."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".md":
        return [(1, "\n".join(lines))]
    blocks, current, start, in_md = [], [], 0, False
    for number, line in enumerate(lines, 1):
        if line.startswith("# %%"):
            if in_md and current:
                blocks.append((start, "\n".join(current)))
            in_md, current, start = "[markdown]" in line, [], number + 1
        elif in_md:
            current.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
    if in_md and current:
        blocks.append((start, "\n".join(current)))
    return blocks


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))  # keep line numbers and columns


def findings_in(path: Path, root: Path = ROOT) -> list[Finding]:
    found = []
    for start, text in prose_blocks(path):
        clean = text
        for pattern in _STRIP:
            clean = pattern.sub(_blank, clean)
        for offset, line in enumerate(clean.splitlines()):
            for kind, pattern in PATTERNS.items():
                for m in pattern.finditer(line):
                    found.append(Finding(str(path.relative_to(root)), start + offset, kind,
                                         m.group(0), text.splitlines()[offset]))
    return _dedupe(found)


def _dedupe(found: list[Finding]) -> list[Finding]:
    """One finding per (line, number): `≈ 0.5 s` is one typed figure, not three."""
    seen, out = set(), []
    for f in found:
        digits = re.search(r"\d+(?:[.,]\d+)*", f.text).group(0)
        key = (f.file, f.line, digits)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def load_allow(path: Path = ALLOW) -> list[dict]:
    entries = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else []
    for k, entry in enumerate(entries or []):
        missing = {"file", "text", "reason"} - set(entry)
        if missing or not str(entry.get("reason", "")).strip():
            raise ValueError(f"{path.name} entry {k + 1}: needs file, text and a reason "
                             f"(missing: {', '.join(sorted(missing)) or 'reason text'})")
    return entries or []


def allowed(f: Finding, allow: list[dict]) -> dict | None:
    return next((a for a in allow if a["file"] == f.file and str(a["text"]) in f.sentence), None)


def prose_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / "notebooks").glob("*.py")) + sorted((root / "book").glob("*.md"))


def check(root: Path = ROOT, allow_path: Path | None = None) -> tuple[list[Finding], list[dict]]:
    """(findings not on the allow-list, allow-list entries that match nothing)."""
    allow = load_allow(allow_path or root / "book" / "prose_numbers_allow.yml")
    bad, used = [], set()
    for path in prose_files(root):
        for f in findings_in(path, root):
            entry = allowed(f, allow)
            if entry is None:
                bad.append(f)
            else:
                used.add(id(entry))
    return bad, [a for a in allow if id(a) not in used]


def main() -> int:
    bad, stale = check()
    for f in bad:
        print(f)
    for a in stale:
        print(f"{ALLOW.relative_to(ROOT)}: entry {a['file']} {a['text']!r} matches nothing: remove it")
    return 1 if bad or stale else 0


if __name__ == "__main__":
    sys.exit(main())
