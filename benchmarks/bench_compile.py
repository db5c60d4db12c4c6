"""Benchmark: `torch.compile` (inductor) of the offline recipe's fine-tuned stage on CPU.

The stage is `layer4` of ResNet-50 (train mode, as the trainer runs it: bf16 autocast,
channels_last), forward + backward on a batch of 32 cached `layer3` outputs
(32, 1024, 14, 14); it is about two thirds of the offline training step. Eager and
compiled are timed side by side in one process, interleaved (median of `--reps`), after
the compiled one's first call, whose seconds (the compilation, with an empty inductor cache)
are reported separately.

Prints one JSON object and writes it to benchmarks/results/compile_cpu.json.

    python benchmarks/bench_compile.py [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# a fresh inductor cache, so that compile_seconds is what a first run pays (a warm cache
# from an earlier run would make it a few seconds)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-compile-")

import torch  # after the cache location is set
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gemm import cpu  # benchmarks/ is a folder of scripts, not a package

RESULTS = Path(__file__).resolve().parent / "results" / "compile_cpu.json"


def _step(stage, x: torch.Tensor) -> float:
    """Seconds of one forward + backward of `stage` on `x` under bf16 autocast."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = stage(x)  # (B, 2048, 7, 7)
    y.float().mean().backward()
    return time.perf_counter() - start


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stage = torchvision.models.resnet50(weights=None).layer4.train()
    stage = stage.to(memory_format=torch.channels_last)
    x = torch.randn(32, 1024, 14, 14).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(stage)
    compile_seconds = _step(compiled, x)  # the first call compiles
    runs = {"eager": stage, "compiled": compiled}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, fn in runs.items():
        _step(fn, x)  # warm-up
    for _ in range(args.reps):
        for name, fn in runs.items():  # interleaved: noise hits both alike
            times[name].append(_step(fn, x))
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "torch.compile (inductor) of the fine-tuned layer4, forward + backward",
        "command": "python benchmarks/bench_compile.py " + " ".join(sys.argv[1:]),
        "batch": 32, "threads": args.threads, "reps": args.reps,
        "precision": "bf16 autocast, channels_last (the trainer's CPU default)",
        "torch": torch.__version__, "cpu": cpu(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "compile_seconds": round(compile_seconds, 1),
        "ms_per_step_median": {n: round(1000 * s, 1) for n, s in median.items()},
        "images_per_s": {n: round(32 / s, 1) for n, s in median.items()},
        "speedup_compiled_over_eager": round(median["eager"] / median["compiled"], 2),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
