"""Benchmark: one training step of the book's offline recipe, fp32 vs bf16, captions/s.

The step of `caption_lib.train`: the cached output of the recipe's frozen part
(B, C, h, w) -> the fine-tuned encoder blocks -> decoder (recipe "shapes": 256/256/256)
-> loss -> backward -> Adam, on a batch of 32 images with one caption each (13 tokens,
V = 36). "fp32" runs everything in float32;
"bf16" is the trainer's default on a CPU (bf16 autocast + channels_last for the encoder
stage, decoder in float32). Both are measured side by side in one run; the JSON goes to
benchmarks/results/train.json.

    python benchmarks/bench_train.py [--repeats 5]
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
from caption_lib.train import recipe
from caption_lib.vocab import Vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gemm import cpu  # benchmarks/ is a folder of scripts, not a package

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
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    B, L = 32, 13
    side = model.encoder.cached_side(224)
    cached = torch.randn(B, model.encoder.cached_channels, side, side).half()  # (B, C, h, w)
    captions = torch.randint(4, len(model.vocab), (B, L))  # (B, L)
    captions[:, 0] = model.vocab.start_id
    lengths = torch.full((B,), L)  # (B,)
    device = torch.device("cpu")

    def step(precision: str) -> float:
        start = time.perf_counter()
        loss, _ = model.cached_loss(cached.to(device), captions, lengths, precision=precision)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    times = {"fp32": [], "bf16": []}
    for p in times:
        step("fp32" if p == "fp32" else "auto")  # warm-up
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        times["fp32"].append(step("fp32"))
        times["bf16"].append(step("auto"))
    median = {p: statistics.median(t) for p, t in times.items()}
    result = {
        "benchmark": "training step of the offline recipe, fp32 vs bf16",
        "fine_tune": model_config.fine_tune,
        "threads": torch.get_num_threads(),
        "cpu": cpu(),
        "batch_captions": B,
        "ms_per_step_median": {p: round(1000 * s, 1) for p, s in median.items()},
        "captions_per_s": {p: round(B / s, 1) for p, s in median.items()},
        "speedup_bf16_over_fp32": round(median["fp32"] / median["bf16"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
