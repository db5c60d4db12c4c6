"""Author notebooks as jupytext percent scripts; generate and execute the .ipynb files.

Each chapter is written in `notebooks/NN_name.py` (jupytext "percent" format: easy to
diff, review and edit) and paired with `notebooks/NN_name.ipynb`, which is committed
with its outputs so that readers on GitHub and Colab see results before running anything.

    python tools/notebooks.py sync        # .py -> .ipynb (sources only, outputs kept where cells are unchanged)
    python tools/notebooks.py execute     # .py -> .ipynb, then execute in notebooks/ and save outputs
    python tools/notebooks.py check       # exit 1 when a pair is out of sync
    python tools/notebooks.py run 05 -p DATASET=flickr8k --out DIR
                                          # execute with parameters into DIR (papermill-style)

`run` leaves `notebooks/*.ipynb` alone: it injects `NAME = value` lines as a new cell
right after the cell tagged `parameters` (tagged `injected-parameters`, as papermill
does), executes in `notebooks/` and writes the executed copy into `--out`.
`tests/test_book.py` runs `check`; `tests/test_colab.py` runs chapters with `run`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


# pages of notebooks that are not numbered chapters (the appendix)
APPENDIX = ["results"]


def pairs(names: list[str] | None = None) -> list[tuple[Path, Path]]:
    scripts = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    scripts += [NOTEBOOKS / f"{name}.py" for name in APPENDIX]
    if names:
        scripts = [s for s in scripts if any(n in s.stem for n in names)]
    return [(s, s.with_suffix(".ipynb")) for s in scripts]


def _key(cell) -> tuple[str, str]:
    return cell.cell_type, cell.source.strip()


def from_script(script: Path) -> nbformat.NotebookNode:
    nb = jupytext.read(script)
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata.pop("jupytext", None)
    for cell in nb.cells:
        cell.metadata.pop("lines_to_next_cell", None)
    return nb


def out_of_sync(script: Path, notebook: Path) -> str | None:
    """Why `notebook` does not match `script` (None when it does)."""
    if not notebook.exists():
        return f"{notebook.name} is missing"
    want = [_key(c) for c in from_script(script).cells]
    have = [_key(c) for c in nbformat.read(notebook, as_version=4).cells]
    if want != have:
        first = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
        return f"{notebook.name} differs from {script.name} at cell {first}"
    return None


def write(script: Path, notebook: Path, execute: bool) -> None:
    nb = from_script(script)
    if notebook.exists():
        # keep the ids (and, when not executing, the outputs) of unchanged cells: small diffs
        old = {_key(c): c for c in nbformat.read(notebook, as_version=4).cells}
        for cell in nb.cells:
            before = old.get(_key(cell))
            if before is None:
                continue
            if "id" in before:
                cell["id"] = before["id"]
            if cell.cell_type == "code" and not execute:
                cell.outputs = before.get("outputs", [])
                cell.execution_count = before.get("execution_count")
    if execute:
        start = time.perf_counter()
        NotebookClient(nb, timeout=1800, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
        print(f"executed {script.name} in {time.perf_counter() - start:.0f} s")
    nbformat.write(nb, notebook)


def inject(nb: nbformat.NotebookNode, parameters: dict) -> nbformat.NotebookNode:
    """Add `parameters` (NAME -> Python value) as a cell after the `parameters` cell."""
    where = next((i for i, c in enumerate(nb.cells)
                  if "parameters" in c.metadata.get("tags", [])), None)
    if where is None:
        raise ValueError("no cell tagged 'parameters' to inject into")
    source = "# Parameters injected by tools/notebooks.py\n" + "\n".join(
        f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(where + 1, cell)
    return nb


def run(script: Path, parameters: dict, out: Path | None = None, timeout: int = 1800
        ) -> nbformat.NotebookNode:
    """Execute `script` with `parameters` injected; save into `out` (a folder) if given.

    A failing cell raises nbclient's `CellExecutionError` naming the cell; the partly
    executed notebook is still written to `out`, to read what happened.
    """
    nb = inject(from_script(script), parameters) if parameters else from_script(script)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out / script.with_suffix(".ipynb").name)
    return nb


def _value(text: str):
    """A -p value: a Python literal when it is one ("3", "True", "'x'"), else the string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["sync", "execute", "check", "run"])
    parser.add_argument("names", nargs="*", help="only notebooks whose name contains one of these")
    parser.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                        help="run: a parameter to inject (repeatable)")
    parser.add_argument("--out", type=Path, help="run: folder for the executed notebooks")
    args = parser.parse_args()
    failures = 0
    if args.action == "run":
        parameters = dict(p.split("=", 1) for p in args.parameter)
        for script, _ in pairs(args.names):
            start = time.perf_counter()
            run(script, {k: _value(v) for k, v in parameters.items()}, args.out)
            print(f"ran {script.name} in {time.perf_counter() - start:.0f} s")
        return 0
    for script, notebook in pairs(args.names):
        if args.action == "check":
            why = out_of_sync(script, notebook)
            if why:
                print(f"out of sync: {why} (run `python tools/notebooks.py sync`)")
                failures += 1
        else:
            write(script, notebook, execute=args.action == "execute")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
