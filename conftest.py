"""pytest's time per test file, printed at the end of every run: `make test`'s shares; and
the split of `make test` over processes (pytest-xdist, `-n auto --dist loadfile`).

The repository root's conftest, so it sees both `tests/` and nbval's `notebooks/`. Each
test's setup + call + teardown is added to its file; a session fixture's cost lands in
the file of the first test that asks for it (tests/test_shares.py checks the table).
Under xdist the table sums every worker's seconds, so it can exceed the wall time.

Worker processes share the machine's cores: each gets `cores // workers` threads (at
least one), and so do the kernels and subprocesses it starts (OMP_NUM_THREADS). Two
workers that each start two OpenMP threads on two cores spin against each other: the
suite took 1059 s that way against 346 s with one thread each (this machine, 2 cores).
Whole files go to one worker (`--dist loadfile`: a notebook's cells run in order, in one
kernel), longest first (`SLOWEST`, then collection order), so that no long file is left
for the end while the other worker idles.

Kernels: jupyter_client picks a kernel's five TCP ports by binding free ones and letting
them go, and the kernel binds them a moment later. Two workers starting kernels at once
can be handed the same port in that moment ("Address already in use", a kernel that dies
before replying: it failed one CI run in six). So on Linux each worker's kernels (nbval's,
nbclient's, nbgrader's: all started in the worker's process) listen on a loopback address
of their own, 127.0.0.(2 + worker number) (`worker_loopback`); the whole of 127/8 is the
loopback interface there, and ports on different addresses cannot collide.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

# the longest files of make test (the table below, two workers on 2 cores), longest first,
# down to about 5 s; a file not listed keeps its place after these. Order only:
# correctness does not depend on it
SLOWEST = ("tests/test_colab.py", "tests/test_grading.py", "notebooks/07_hard_attention.ipynb",
           "tests/test_distributed.py", "tests/test_train.py", "notebooks/06_inference.ipynb",
           "tests/test_browser.py", "notebooks/05_training.ipynb", "tests/test_hard_attention.py",
           "notebooks/results.ipynb", "notebooks/01_dataset.ipynb", "tests/test_caption_cli.py",
           "tests/test_evaluate.py", "tests/test_model.py", "tests/test_encoder.py",
           "tests/test_book.py", "tests/test_metrics.py", "notebooks/02_encoder.ipynb",
           "notebooks/04_decoder.ipynb", "notebooks/03_attention.ipynb")

_SECONDS: dict[str, float] = defaultdict(float)


def worker_threads(cores: int, workers: int) -> int:
    """Threads for each of `workers` processes sharing `cores` cores (at least one)."""
    return max(1, cores // max(1, workers))


if os.environ.get("PYTEST_XDIST_WORKER"):  # before tests/conftest.py imports torch
    _threads = worker_threads(len(os.sched_getaffinity(0)),
                              int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)


def worker_loopback(worker: str, platform: str = sys.platform) -> str | None:
    """The loopback address for the kernels of xdist worker `worker` ("gw3" ->
    "127.0.0.5"), or None where only 127.0.0.1 is sure to exist (not Linux)."""
    if not platform.startswith("linux") or not worker.startswith("gw"):
        return None
    return f"127.0.0.{2 + int(worker[2:])}"


def pytest_configure(config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    import torch  # in case a plugin imported it before this file was read

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    address = worker_loopback(worker)
    if address:
        from jupyter_client import localinterfaces

        localinterfaces.local_ips()  # the machine's addresses, loaded once
        localinterfaces.LOCALHOST = address  # where this process's kernels listen
        localinterfaces.LOCAL_IPS.append(address)  # and that it is this machine


def pytest_collection_modifyitems(items) -> None:
    """Files in `SLOWEST` first, then the rest in collection order; items keep their
    order within a file (sorted is stable)."""
    rank = {path: i for i, path in enumerate(SLOWEST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOWEST)))


def pytest_runtest_logreport(report) -> None:
    _SECONDS[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    total = sum(_SECONDS.values())
    if total <= 0:
        return
    terminalreporter.write_sep("=", f"time per test file ({total:.0f} s in tests)")
    for path, seconds in sorted(_SECONDS.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f} s {seconds / total:6.1%}  {path}")
