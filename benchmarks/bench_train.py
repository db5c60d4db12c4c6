"""Benchmark: one training step of the book's offline recipe in each precision, and how
much of it the fine-tuned encoder stage takes, against the machine's bf16 GEMM peak.

The step of `caption_lib.train.train_one_epoch`: the cached output of the recipe's frozen
part (B, C, h, w) -> the fine-tuned encoder stage -> decoder (recipe "shapes") -> loss
-> backward -> Adam (the trainer's fused one), on a batch of 32 images with one caption
each (13 tokens, V = 36). Precisions (`TrainConfig.precision`):

- "fp32": everything in float32;
- "auto": the stage under bf16 autocast + channels_last, the decoder in float32 (the
  CPU default; this file's "bf16" before the recipe moved on);
- "bf16": the recipe's: the decoder's forward and loss under the CPU's bf16 autocast too.

"stage": the fine-tuned stage's forward and backward alone (bf16 autocast,
channels_last, as in the step), its FLOPs counted (`_gemm.count_gflop`) and its GFLOP/s
taken as a share of a 2048 x 2048 bf16 matrix product timed in the same interleaved
loop: how close the part of the step that dominates it runs to the machine's peak.
Everything is measured side by side in one run; the JSON goes to
benchmarks/results/train.json.

    python benchmarks/bench_train.py [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from caption_lib.model import Captioner
from caption_lib.runtime import autocast
from caption_lib.train import adam, recipe
from caption_lib.vocab import Vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gemm import Gemm, count_gflop, cpu  # benchmarks/ is a folder of scripts, not a package

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="where to write the JSON (e.g. results/train__<cpu>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_config, _ = recipe("shapes")
    model_config.encoder_weights = None  # offline: random init, the recipe's blocks fine-tuned
    words = [f"w{i}" for i in range(32)]
    model = Captioner(Vocabulary(words), model_config).train()
    model.encoder.trainable.to(memory_format=torch.channels_last)  # as the trainer does
    optimizer = adam(model.parameters())
    B, L = 32, 13
    side = model.encoder.cached_side(224)
    cached = torch.randn(B, model.encoder.cached_channels, side, side).half()  # (B, C, h, w)
    captions = torch.randint(4, len(model.vocab), (B, L))  # (B, L)
    captions[:, 0] = model.vocab.start_id
    lengths = torch.full((B,), L)  # (B,)
    device = torch.device("cpu")
    stage_input = cached.float().contiguous(memory_format=torch.channels_last)  # (B, C, h, w)

    def step(precision: str) -> float:
        start = time.perf_counter()
        with autocast(device, precision, cpu=precision == "bf16"):  # as train_one_epoch
            loss, _ = model.cached_loss(cached, captions, lengths, precision=precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    def stage() -> float:
        start = time.perf_counter()
        with autocast(device, "auto"):
            out = model.encoder.trainable(stage_input)  # (B, 2048, 7, 7)
        out.float().sum().backward()
        return time.perf_counter() - start

    runs = {"fp32": step, "auto": step, "bf16": step, "stage": lambda _: stage()}
    stage_gflop = count_gflop(stage)
    gemm = Gemm(2048, torch.bfloat16)
    times = {name: [] for name in [*runs, "gemm_bf16"]}
    for name, fn in runs.items():
        fn(name)  # warm-up
    for _ in range(args.repeats):  # interleaved, so all see the same machine
        for name, fn in runs.items():
            times[name].append(fn(name))
        times["gemm_bf16"].append(min(gemm.seconds() for _ in range(3)))
    optimizer.zero_grad(set_to_none=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    peak = gemm.gflop / median["gemm_bf16"]  # GFLOP/s
    steps = ("fp32", "auto", "bf16")
    result = {
        "benchmark": "training step of the offline recipe: fp32, auto and bf16; the stage alone",
        "fine_tune": model_config.fine_tune,
        "threads": torch.get_num_threads(),
        "cpu": cpu(),
        "batch_captions": B,
        "ms_per_step_median": {p: round(1000 * median[p], 1) for p in steps},
        "captions_per_s": {p: round(B / median[p], 1) for p in steps},
        "speedup_auto_over_fp32": round(median["fp32"] / median["auto"], 2),
        "speedup_recipe_bf16_over_fp32": round(median["fp32"] / median["bf16"], 2),
        "speedup_recipe_bf16_over_auto": round(median["auto"] / median["bf16"], 2),
        "stage_ms_median": round(1000 * median["stage"], 1),
        "stage_gflop": round(stage_gflop, 1),
        "stage_share_of_recipe_step": round(median["stage"] / median["bf16"], 2),
        "gemm_2048_bf16_gflops_median": round(peak, 1),
        "stage_share_of_bf16_gemm_peak": round(stage_gflop / median["stage"] / peak, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
