"""The root conftest's table of time per test file (make test's shares)."""

from __future__ import annotations

import re

from conftest import ROOT

pytest_plugins = ["pytester"]


def test_time_per_file_table_lists_every_file_once_and_sums_to_one(pytester):
    pytester.makeconftest((ROOT / "conftest.py").read_text())
    pytester.makepyfile(test_slow="import time\n\ndef test_a():\n    time.sleep(0.3)\n",
                        test_fast="def test_b():\n    pass\n\ndef test_c():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    rows = [line for line in result.outlines if re.match(r"\s*[\d.]+ s\s+[\d.]+%  test_", line)]
    assert [row.split()[-1] for row in rows] == ["test_slow.py", "test_fast.py"], rows
    shares = [float(row.split()[2].rstrip("%")) for row in rows]
    assert abs(sum(shares) - 100) < 0.2, shares
    assert float(rows[0].split()[0]) >= 0.3
    assert any("time per test file" in line for line in result.outlines)
