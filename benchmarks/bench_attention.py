"""Benchmark: the attention scores of one decoding step, in one piece vs in chunks.

e = w^T tanh(W_a a_i + W_h h) over (rows, P, A) = (96, 49, 512) for a beam search of 32
images with k = 3 (and (32, 49, 512) for greedy decoding), without autograd:

- "one piece": `full_att((projected + query).tanh_())`, the paper's formula in one piece
  (`Attention.weights` computed this with autograd before it took the sigmoid form); the
  (rows, P, A) sum is a fresh 9.6 MB tensor (fp32, beam).
- "chunks_tanh": the chunks below with the tanh itself: what decoding computed before.
- "chunks": `Attention._scores_in_chunks`, what it computes without autograd on a CPU
  (decoding): `attention.CHUNK` rows at a time through one reused buffer that stays in
  the cache, in fp32 even for bf16 inputs, the tanh as 2 sigma(2x) - 1 folded into w and
  b (`attention.sigmoid_form`): on the 2-core AMD EPYC of issue 19 torch's fp32 tanh ran
  at about 0.8 G elements/s and its sigmoid at about 4.7.

In fp32 both give the same scores; for bf16 inputs the chunks' fp32 scores differ from
the one-piece bf16 ones by bf16 rounding (`max_abs_difference`). The two are timed in turns,
`--reps` rounds of 50 calls each (median of the rounds), in fp32 and in bf16 (weights and
inputs in bfloat16, as `precision="bf16"` decoding runs them). Also timed: an in-place
tanh over (96, P, A) in fp32 and in bf16 (`tanh_ms_96_rows`), and the sigmoid form's
in-place doubling and sigmoid over the same tensor (`sigmoid_form_ms_96_rows`). Writes
benchmarks/results/attention.json (`--out`: another file, e.g. named by machine).

    python benchmarks/bench_attention.py [--reps 9] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from caption_lib.attention import CHUNK, Attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gemm import cpu as cpu_info  # benchmarks/ is a folder of scripts, not a package

RESULTS = Path(__file__).resolve().parent / "results" / "attention.json"
P, E, A, H = 49, 2048, 512, 512
ROWS = {"beam": 96, "greedy": 32}  # a step of 32 images with k = 3, and with k = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CALLS = 50


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ms_per_call(fn) -> float:
    """One repetition: a warm-up call, then the mean of CALLS calls, in ms."""
    fn()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - start) / CALLS * 1e3


def _one_piece(attention: Attention, query: torch.Tensor, projected: torch.Tensor):
    return attention.full_att((projected + query.unsqueeze(1)).tanh_()).squeeze(2)  # (R, P)


def _chunks_tanh(attention: Attention, query: torch.Tensor, projected: torch.Tensor):
    """The chunks with the tanh itself (decoding before the sigmoid form): (R, P)."""
    R = projected.shape[0]
    dtype = torch.promote_types(projected.dtype, torch.float32)
    weight, bias = attention.full_att.weight.to(dtype), attention.full_att.bias.to(dtype)
    buffer = projected.new_empty((min(R, CHUNK), P, A), dtype=dtype)  # (CHUNK, P, A)
    scores = []
    for start in range(0, R, CHUNK):
        rows = min(CHUNK, R - start)
        part = torch.add(projected[start:start + rows], query[start:start + rows].unsqueeze(1),
                         out=buffer[:rows])  # (rows, P, A)
        scores.append(torch.nn.functional.linear(part.tanh_(), weight, bias).squeeze(2))
    return torch.cat(scores)  # (R, P)


def _case(rows: int, dtype: torch.dtype, reps: int) -> dict:
    """ms per call of each way for `rows` rows in `dtype` (repetitions interleaved), and
    the largest difference between their scores."""
    gen = torch.Generator().manual_seed(0)
    attention = Attention(E, H, A).to(dtype).eval()
    projected = torch.randn(rows, P, A, generator=gen).to(dtype)  # (R, P, A)
    query = torch.randn(rows, A, generator=gen).to(dtype)  # (R, A)
    ways = {"one_piece": lambda: _one_piece(attention, query, projected),
            "chunks_tanh": lambda: _chunks_tanh(attention, query, projected),
            "chunks": lambda: attention._scores_in_chunks(query, projected)}
    ms: dict[str, list[float]] = {name: [] for name in ways}
    with torch.no_grad():
        diff = float((ways["one_piece"]().float() - ways["chunks"]().float()).abs().max())
        for _ in range(reps):
            for name, fn in ways.items():
                ms[name].append(_ms_per_call(fn))
    median = {name: round(statistics.median(times), 3) for name, times in ms.items()}
    return {"rows": rows, "dtype": _name(dtype), "ms_per_call": median,
            "speedup_chunks": round(median["one_piece"] / median["chunks"], 2),
            "speedup_sigmoid_form": round(median["chunks_tanh"] / median["chunks"], 2),
            "max_abs_difference": diff}


def _tanh_ms(rows: int, reps: int) -> dict[str, float]:
    """ms of an in-place tanh over (rows, P, A), fp32 vs bf16: the op that makes the one-piece
    bf16 scores slow on CPUs without a fast bf16 tanh."""
    ms = {}
    for dtype in DTYPES.values():
        x = torch.randn(rows, P, A).to(dtype)  # (R, P, A)
        ms[_name(dtype)] = round(statistics.median(_ms_per_call(x.tanh_) for _ in range(reps)), 3)
    return ms


def _sigmoid_form_ms(rows: int, reps: int) -> float:
    """ms of what replaces that tanh in the chunks: x.mul_(2).sigmoid_() over (rows, P, A),
    fp32 (its values stay in (0, 1): nothing overflows from one call to the next)."""
    x = torch.randn(rows, P, A)  # (R, P, A)
    return round(statistics.median(_ms_per_call(lambda: x.mul_(2.0).sigmoid_())
                                   for _ in range(reps)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    labels = {(rows, _name(dtype)): f"{short}_{kind}" for short, dtype in DTYPES.items()
              for kind, rows in ROWS.items()}
    cases = [_case(rows, dtype, args.reps) for dtype in DTYPES.values() for rows in ROWS.values()]
    for case in cases:
        print(f"{case['dtype']:8s} rows {case['rows']:3d}: one piece "
              f"{case['ms_per_call']['one_piece']:.3f} ms, chunks {case['ms_per_call']['chunks']:.3f}"
              f" ms = {case['speedup_chunks']:.2f}x (max |diff| {case['max_abs_difference']:.1e});"
              f" chunks with tanh {case['ms_per_call']['chunks_tanh']:.3f} ms: the sigmoid form"
              f" {case['speedup_sigmoid_form']:.2f}x")
    tanh = _tanh_ms(ROWS["beam"], args.reps)
    sigmoid = _sigmoid_form_ms(ROWS["beam"], args.reps)
    print(f"tanh_ over ({ROWS['beam']}, {P}, {A}): fp32 {tanh['float32']:.3f} ms, "
          f"bf16 {tanh['bfloat16']:.3f} ms; mul_(2).sigmoid_() fp32 {sigmoid:.3f} ms")
    result = {"benchmark": "attention scores of one decoding step: one piece vs chunks",
              "speedup_chunks_over_one_piece": {labels[case["rows"], case["dtype"]]:
                                                case["speedup_chunks"] for case in cases},
              "command": "python benchmarks/bench_attention.py " + " ".join(sys.argv[1:]),
              f"tanh_ms_{ROWS['beam']}_rows": tanh,
              f"sigmoid_form_ms_{ROWS['beam']}_rows": sigmoid,
              "speedup_sigmoid_form": {labels[case["rows"], case["dtype"]]:
                                       case["speedup_sigmoid_form"] for case in cases},
              "shape": {"P": P, "A": A}, "chunk_rows": CHUNK, "calls_per_rep": CALLS,
              "reps": args.reps, "threads": args.threads, "torch": torch.__version__,
              "python": platform.python_version(), "cpu": cpu_info(), "cases": cases}
    args.out.parent.mkdir(exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
