"""Benchmark: one decoder training step, hard vs soft attention, at the Colab sizes.

The step the trainer runs on cached features when the encoder is frozen (the paper's and
the Colab recipe's setting): region features (B, 49, 2048) -> `Captioner.loss` ->
backward -> gradient clipping -> Adam. Decoder sizes of `recipe("flickr8k")` (512/512/512,
dropout 0.5), B = 64 captions of 10-22 tokens, V = 3000 words (the order of Flickr8k's
vocabulary). "soft" is the expected context; "hard" the REINFORCE estimator of
`caption_lib.hard_attention` with the paper's expected context for half the captions;
"hard, all sampled" draws a location for every caption. Measured side by side in one
process (interleaved); the JSON goes to benchmarks/results/hard.json.

    python benchmarks/bench_hard.py [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from caption_lib.model import Captioner
from caption_lib.train import recipe
from caption_lib.vocab import Vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gemm import cpu as cpu_info  # benchmarks/ is a folder of scripts, not a package

B, P, E, V = 64, 49, 2048, 3000


class _NoEncoder(torch.nn.Module):
    """Stands in for the frozen encoder: the step starts from cached region features."""

    encoder_dim = E
    trained_stages = ()


def _models(device: torch.device) -> dict[str, Captioner]:
    model_config, _ = recipe("flickr8k")
    vocab = Vocabulary([f"w{i}" for i in range(V - 4)])
    variants = {"soft": {"attention": "soft"}, "hard": {"attention": "hard"},
                "hard, all sampled": {"attention": "hard", "expected_prob": 0.0}}
    models = {}
    for name, change in variants.items():
        torch.manual_seed(0)
        config = dataclasses.replace(model_config, encoder_weights=None, **change)
        models[name] = Captioner(vocab, config, encoder=_NoEncoder()).to(device).train()
    return models


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(2)
    models = _models(device)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(B, P, E, generator=g).to(device)  # (B, P, E)
    lengths = torch.randint(10, 23, (B,), generator=g)  # (B,)
    captions = torch.randint(4, V, (B, int(lengths.max())), generator=g)  # (B, L)
    captions[:, 0] = 1
    captions, lengths = captions.to(device), lengths.to(device)
    optimizers = {n: torch.optim.Adam(m.decoder.parameters(), lr=4e-4) for n, m in models.items()}

    cpu: dict[str, list[float]] = {name: [] for name in models}

    def step(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, _ = model.loss(features, captions, lengths)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), 5.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        cpu[name].append(time.process_time() - cpu_start)  # all threads of this process
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in models}
    for name in models:
        step(name)  # warm-up
    for _ in range(args.repeats):  # interleaved, so every variant sees the same machine
        for name in models:
            times[name].append(step(name))
    median = {name: statistics.median(t) for name, t in times.items()}
    cpu_median = {name: statistics.median(t[1:]) for name, t in cpu.items()}  # no warm-up
    result = {
        "benchmark": "decoder training step at the Colab sizes: hard vs soft attention",
        "sizes": {"captions": B, "regions": P, "encoder_dim": E, "vocab": V,
                  "tokens": [int(lengths.min()), int(lengths.max())],
                  "embed_dim": 512, "decoder_dim": 512, "attention_dim": 512},
        "device": str(device), "threads": torch.get_num_threads(), "repeats": args.repeats,
        "torch": torch.__version__, "machine": platform.machine(), "cpu": cpu_info(),
        "ms_per_step_median": {name: round(1000 * s, 1) for name, s in median.items()},
        "seconds_all": {name: [round(s, 3) for s in t] for name, t in times.items()},
        "ratio_hard_over_soft": round(median["hard"] / median["soft"], 2),
        "ratio_all_sampled_over_soft": round(median["hard, all sampled"] / median["soft"], 2),
        "cpu_ms_per_step_median": {name: round(1000 * s, 1) for name, s in cpu_median.items()},
        "cpu_ratio_hard_over_soft": round(cpu_median["hard"] / cpu_median["soft"], 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "command": "python benchmarks/bench_hard.py --repeats " + str(args.repeats),
    }
    out = Path(__file__).resolve().parent / "results" / "hard.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
