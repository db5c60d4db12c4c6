"""Sphinx extension: each page loads every script once.

sphinx-thebe 0.3.1 (part of Jupyter Book 1.x) adds its inline configuration script,
`const THEBE_JS_URL = ...`, each time `env-before-read-docs` fires, and a Jupyter Book
build fires it twice: the second copy threw "Identifier 'THEBE_JS_URL' has already been
declared" on every page (found by tools/check_book.py). This drops exact repeats from
the page's script list, keeping the first of each.
"""

from __future__ import annotations


def _script_key(script) -> tuple:
    """What makes two scripts the same (Sphinx stores an inline script's filename as
    either None or "", so both count as no file)."""
    filename = getattr(script, "filename", script) or ""
    attributes = getattr(script, "attributes", {}) or {}
    return str(filename), tuple(sorted((k, str(v)) for k, v in attributes.items()))


def drop_repeated_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        key = _script_key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", drop_repeated_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
