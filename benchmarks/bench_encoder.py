"""Benchmark: feature extraction fp32 vs bf16 + channels_last, and an epoch from the cache.

Prints one JSON object (and writes benchmarks/results/encoder.json):
- extraction images/s of the frozen ResNet-50 (a batch of 32, 224x224): fp32; bf16
  autocast + channels_last on the whole batch; and what `features.cached_features` runs,
  the same with BatchNorm folded into the convolutions (`encoder.fold_batchnorm`) and the
  batch in pieces of `features.cpu_piece` images (8 at 224x224). The ratios of the three;
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
from caption_lib.features import cpu_piece, extract_frozen, inference_copy


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
    images = torch.randn(32, 3, 224, 224)  # (B, 3, 224, 224)
    whole, folded = len(images), inference_copy(encoder.frozen, fast=True)

    fp32 = _median_seconds(lambda: extract_frozen(encoder.frozen, images, fast=False,
                                                  piece=whole), args.repeats)
    fast = _median_seconds(lambda: extract_frozen(encoder.frozen, images, piece=whole),
                           args.repeats)
    library = _median_seconds(lambda: extract_frozen(folded, images), args.repeats)

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
        "extract_batch": len(images),
        "extract_piece": cpu_piece(224, 224),
        "extract_fp32_images_per_s": round(len(images) / fp32, 1),
        "extract_bf16_channels_last_images_per_s": round(len(images) / fast, 1),
        "extract_library_images_per_s": round(len(images) / library, 1),
        "extract_speedup": round(fp32 / fast, 2),
        "extract_speedup_folded_pieces_over_bf16": round(fast / library, 2),
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
