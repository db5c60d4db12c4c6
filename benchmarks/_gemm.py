"""Shared by the benchmarks: this machine's GEMM throughput and a step's FLOP count.

A benchmark that says "x % of the machine's GEMM peak" needs two numbers measured in the
same run: the FLOPs of the step (counted by `torch.utils.flop_counter.FlopCounterMode`,
which adds up every matrix product, forward and backward: 2 * m * n * k each) and what a
plain square matrix product reaches on the same threads and precision (`gemm_gflops`).
Elementwise work (softmax, tanh, the LSTM gates, Adam) is not counted: it is the part
that keeps a step below the peak.

`cpu()` names the processor and its matrix extensions, for the result files.

Not a benchmark itself (`make bench` runs `bench_*.py` only).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_gflop(fn: Callable[[], object]) -> float:
    """GFLOP of the matrix products `fn()` runs (its backward too, if it calls one)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


class Gemm:
    """An n x n matrix product in `dtype`; `seconds()` times one (call it interleaved with
    the steps being measured, so that a shared machine's load hits both alike).

    `rows`: instead, a (rows, n) input times an (n, n) weight in a decoder step's layout,
    x W^T: a loop step's products have only a batch of rows (the recurrence must finish
    step t before step t + 1), and what such a product reaches by itself bounds the step."""

    def __init__(self, n: int = 2048, dtype: torch.dtype = torch.float32, rows: int | None = None):
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(rows or n, n, generator=gen).to(dtype)  # (rows, n)
        weight = torch.randn(n, n, generator=gen).to(dtype)  # (n, n)
        self.b = weight.t() if rows else weight  # x W^T for a step's product
        self.gflop = 2 * (rows or n) * n * n / 1e9
        self.seconds()  # warm-up

    def seconds(self) -> float:
        start = time.perf_counter()
        torch.mm(self.a, self.b)  # (rows, n)
        return time.perf_counter() - start


def cpu() -> dict[str, object]:
    """The CPU the figures were measured on: its model name and the matrix extensions that
    decide its bf16 speed (AMX makes bf16 products several times faster than avx512_bf16
    alone; the machines this project runs on have differed in that between sessions)."""
    info: dict[str, object] = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["model"] = value.strip()
        elif key.strip() == "flags":
            wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")
            info["flags"] = [f for f in wanted if f in value.split()]
            break
    return info
