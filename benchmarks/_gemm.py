"""Shared by the benchmarks: this machine's GEMM throughput and a step's FLOP count.

A benchmark that says "x % of the machine's GEMM peak" needs two numbers measured in the
same run: the FLOPs of the step (counted by `torch.utils.flop_counter.FlopCounterMode`,
which adds up every matrix product, forward and backward: 2 * m * n * k each) and what a
plain square matrix product reaches on the same threads and precision (`gemm_gflops`).
Elementwise work (softmax, tanh, the LSTM gates, Adam) is not counted: it is the part
that keeps a step below the peak.

Not a benchmark itself (`make bench` runs `bench_*.py` only).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_gflop(fn: Callable[[], object]) -> float:
    """GFLOP of the matrix products `fn()` runs (its backward too, if it calls one)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


class Gemm:
    """An n x n matrix product in `dtype`; `seconds()` times one (call it interleaved with
    the steps being measured, so that a shared machine's load hits both alike)."""

    def __init__(self, n: int = 2048, dtype: torch.dtype = torch.float32):
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=gen).to(dtype)  # (n, n)
        self.b = torch.randn(n, n, generator=gen).to(dtype)  # (n, n)
        self.gflop = 2 * n ** 3 / 1e9
        self.seconds()  # warm-up

    def seconds(self) -> float:
        start = time.perf_counter()
        torch.mm(self.a, self.b)  # (n, n)
        return time.perf_counter() - start
