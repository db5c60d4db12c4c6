"""Benchmark: the decoder's training step with subnormal floats flushed (`train`'s CPU
default, `runtime.flush_denormals`) vs not, on ordinary and on saturating features.

Chapter 5's frozen random encoder gives features about 18 times larger than the
fine-tuned one's (mean 18, max 231 on the fresh clone's cache). The decoder's units
saturate on them, and its gradients and Adam moments fall below 1.2e-38 (subnormal in
fp32), which x86 cores process many times slower. This benchmark rebuilds that case
without any data: region features relu(N(0, s^2)) of shape (B, 49, 2048) with s = 1
("ordinary") or s = 30 ("saturating": mean about 12, max about 145), random captions of
8-12 tokens over a 40-word vocabulary, and the decoder of `recipe("shapes")`, trained from
its seed with the trainer's Adam (`train.adam`) at the recipe's learning rate.

Each measurement is one run of `--steps` steps from a fresh start (subnormals accumulate
as the run goes on); its figure is the mean time of the last 10 steps. The four settings
are run in turn, `--repeats` times (the order reversed every other time), and the median
run counts. Also recorded: how many of
Adam's second moments are subnormal at the end. "ordinary" is the control: no subnormals
arise there, so its ratio is 1 up to this machine's noise (0.88-1.08 in five runs on the
day it was written, at 2 threads and 1). Writes benchmarks/results/denormals.json.

    python benchmarks/bench_denormals.py [--steps 30] [--repeats 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from caption_lib.decoder import DecoderWithAttention, loss_terms
from caption_lib.runtime import flush_denormals
from caption_lib.train import adam, recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gemm import cpu as cpu_info  # benchmarks/ is a folder of scripts, not a package

RESULTS = Path(__file__).resolve().parent / "results" / "denormals.json"
B, P, E, V, L = 32, 49, 2048, 40, 12
SCALES = {"ordinary": 1.0, "saturating": 30.0}
TINY = torch.finfo(torch.float32).tiny  # the smallest normal fp32 number, 1.2e-38


def _batch(scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (B, P, E), captions (B, L) and lengths (B,), the same for every run."""
    gen = torch.Generator().manual_seed(0)
    features = (torch.randn(B, P, E, generator=gen) * scale).relu()  # (B, P, E)
    captions = torch.randint(3, V, (B, L), generator=gen)  # (B, L)
    lengths = torch.randint(8, L + 1, (B,), generator=gen)  # (B,)
    captions[:, 0] = 1  # <start>
    for row, n in enumerate(lengths.tolist()):
        captions[row, n - 1], captions[row, n:] = 2, 0  # <end>, then <pad>
    return features, captions, lengths


def run(scale: float, flushed: bool, steps: int) -> tuple[float, int]:
    """One fresh run: (mean seconds of the last 10 steps, subnormal Adam moments)."""
    model_config, config = recipe("shapes")
    features, captions, lengths = _batch(scale)
    torch.manual_seed(0)
    decoder = DecoderWithAttention(V, E, model_config.embed_dim, model_config.decoder_dim,
                                   model_config.attention_dim, dropout=model_config.dropout)
    optimizer = adam([{"params": list(decoder.parameters()), "lr": config.lr}])
    seconds = []
    scope = flush_denormals(torch.device("cpu")) if flushed else contextlib.nullcontext()
    with scope:
        for _ in range(steps):
            start = time.perf_counter()
            logits, alphas = decoder(features, captions, lengths)  # (B, L-1, V), (B, L-1, P)
            xent, doubly, _ = loss_terms(logits, captions, lengths, alphas)
            optimizer.zero_grad(set_to_none=True)
            (xent + model_config.alpha_c * doubly).backward()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
    moments = [s["exp_avg_sq"] for s in optimizer.state.values()]
    subnormal = sum(int(((m > 0) & (m < TINY)).sum()) for m in moments)
    return statistics.mean(seconds[-10:]), subnormal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.steps < 10:
        parser.error(f"--steps must be at least 10 (the last 10 are timed), got {args.steps}")
    torch.set_num_threads(args.threads)
    settings = [(name, flushed) for name in SCALES for flushed in (False, True)]
    times = {s: [] for s in settings}
    subnormal = {}
    for repeat in range(args.repeats):
        for name, flushed in settings[::-1] if repeat % 2 else settings:  # order alternates
            seconds, count = run(SCALES[name], flushed, args.steps)
            times[(name, flushed)].append(seconds)
            subnormal[(name, flushed)] = count
    ms = {f"{name}/{'flushed' if f else 'plain'}": round(1000 * statistics.median(v), 1)
          for (name, f), v in times.items()}
    result = {
        "benchmark": "decoder training step, subnormal floats flushed vs not",
        "sizes": {"batch": B, "regions": P, "encoder_dim": E, "vocab": V, "max_len": L,
                  "feature_scale": SCALES},
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "torch": torch.__version__, "machine": platform.machine(), "cpu": cpu_info(),
        "ms_per_step_median": ms,
        "ms_per_step_all": {f"{name}/{'flushed' if f else 'plain'}": [round(1000 * x, 1) for x in v]
                            for (name, f), v in times.items()},
        "subnormal_adam_moments_at_end": {
            f"{name}/{'flushed' if f else 'plain'}": n for (name, f), n in subnormal.items()},
        "speedup_flushed_over_plain": {
            name: round(ms[f"{name}/plain"] / ms[f"{name}/flushed"], 2) for name in SCALES},
        "command": " ".join(["python benchmarks/bench_denormals.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
