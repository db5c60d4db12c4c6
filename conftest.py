"""pytest's time per test file, printed at the end of every run: `make test`'s shares.

The repository root's conftest, so it sees both `tests/` and nbval's `notebooks/`. Each
test's setup + call + teardown is added to its file; a session fixture's cost lands in
the file of the first test that asks for it (tests/test_shares.py checks the table).
"""

from __future__ import annotations

from collections import defaultdict

_SECONDS: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report) -> None:
    _SECONDS[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    total = sum(_SECONDS.values())
    if total <= 0:
        return
    terminalreporter.write_sep("=", f"time per test file ({total:.0f} s in tests)")
    for path, seconds in sorted(_SECONDS.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f} s {seconds / total:6.1%}  {path}")
