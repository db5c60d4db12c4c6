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


def _root_conftest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_worker_gets_its_share_of_the_cores():
    threads = _root_conftest().worker_threads
    assert threads(2, 2) == 1 and threads(16, 2) == 8 and threads(16, 3) == 5
    assert threads(1, 4) == 1 and threads(4, 0) == 4


def test_this_worker_runs_with_its_share_of_the_threads():
    import os

    import torch

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        import pytest

        pytest.skip("runs under pytest-xdist only (make test)")
    expected = _root_conftest().worker_threads(
        len(os.sched_getaffinity(0)), int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    assert os.environ["OMP_NUM_THREADS"] == str(expected)  # kernels and subprocesses
    assert torch.get_num_threads() == expected


def test_the_slowest_files_are_collected_first_in_order(pytester):
    pytester.makeconftest((ROOT / "conftest.py").read_text())
    tests = pytester.mkpydir("tests")
    for name in ("test_aaa.py", "test_train.py", "test_colab.py"):
        (tests / name).write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q", "tests")
    ids = [line for line in result.outlines if "::" in line]
    assert ids == ["tests/test_colab.py::test_one", "tests/test_colab.py::test_two",
                   "tests/test_train.py::test_one", "tests/test_train.py::test_two",
                   "tests/test_aaa.py::test_one", "tests/test_aaa.py::test_two"], ids


def test_every_file_named_slowest_exists():
    """A renamed or removed file in `SLOWEST` would silently drop out of the order."""
    missing = [path for path in _root_conftest().SLOWEST if not (ROOT / path).is_file()]
    assert not missing, f"conftest.py SLOWEST names files that do not exist: {missing}"


def test_each_worker_has_its_own_loopback_address_on_linux():
    address = _root_conftest().worker_loopback
    assert address("gw0", "linux") == "127.0.0.2" and address("gw13", "linux") == "127.0.0.15"
    assert address("gw0", "darwin") is None and address("master", "linux") is None


def test_this_workers_kernels_listen_on_its_own_address():
    """A kernel started here (as nbval, nbclient and nbgrader start theirs) binds the
    worker's address, so two workers' kernels cannot be handed the same port."""
    import os
    import sys

    import pytest
    from jupyter_client.manager import start_new_kernel

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or not sys.platform.startswith("linux"):
        pytest.skip("runs under pytest-xdist on Linux only (make test)")
    manager, client = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        assert manager.ip == _root_conftest().worker_loopback(worker)
        assert client.execute_interactive("1 + 1", timeout=30)["content"]["status"] == "ok"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
