"""Benchmark: feature extraction fp32 vs bf16 + channels_last, and an epoch from the cache.

Prints one JSON object (and writes benchmarks/results/encoder.json):
- extraction images/s of the frozen ResNet-50 (batch 16, 224x224), fp32 vs bf16 autocast +
  channels_last, and their ratio;
- a training "epoch" of the paper's setting (frozen encoder, decoder 512/512/512, batch 32,
  captions of length 20, V=5000), measured over a few batches: reading cached features vs
  running the CNN (fp32, as the usual tutorials do) at every step; the ratio of the two.
All figures come from one run, side by side (this machine is noisy: compare ratios).

    python benchmarks/bench_encoder.py [--repeats 3] [--batches 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from caption_lib.decoder import DecoderWithAttention, caption_loss
from caption_lib.encoder import EncoderCNN
from caption_lib.features import extract_frozen


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = EncoderCNN(weights=None).eval()  # frozen, as in the paper
    images = torch.randn(16, 3, 224, 224)  # (B, 3, 224, 224)

    fp32 = _median_seconds(lambda: extract_frozen(encoder, images, fast=False), args.repeats)
    fast = _median_seconds(lambda: extract_frozen(encoder, images, fast=True), args.repeats)

    decoder = DecoderWithAttention(5000)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=4e-4)
    B, L = 32, 20
    captions = torch.randint(4, 5000, (B, L))  # (B, L)
    lengths = torch.full((B,), L)  # (B,)
    cached = torch.randn(B, 49, 2048).half()  # (B, 49, 2048) as stored
    batch_images = torch.randn(B, 3, 224, 224)  # (B, 3, 224, 224)

    def decoder_step(features: torch.Tensor) -> None:
        logits, alphas = decoder(features, captions, lengths)  # (B, L-1, V), (B, L-1, P)
        loss, _ = caption_loss(logits, captions, lengths, alphas)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def epoch_from_cache() -> None:
        for _ in range(args.batches):
            decoder_step(cached.float())

    def epoch_with_cnn() -> None:
        for _ in range(args.batches):
            with torch.no_grad():
                features = encoder(batch_images)  # (B, 49, 2048), fp32 every step
            decoder_step(features)

    cache_s = _median_seconds(epoch_from_cache, args.repeats)
    cnn_s = _median_seconds(epoch_with_cnn, args.repeats)
    result = {
        "threads": torch.get_num_threads(),
        "extract_fp32_images_per_s": round(16 / fp32, 1),
        "extract_bf16_channels_last_images_per_s": round(16 / fast, 1),
        "extract_speedup": round(fp32 / fast, 2),
        "epoch_batches": args.batches,
        "epoch_from_cache_s": round(cache_s, 2),
        "epoch_cnn_every_step_s": round(cnn_s, 2),
        "epoch_speedup": round(cnn_s / cache_s, 2),
    }
    out = Path(__file__).resolve().parent / "results" / "encoder.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
