"""Decoder training step: caption_lib's decoder vs the common tutorial formulation.

One training step = forward + caption loss + backward + Adam update, at the sizes of the
book's Colab run: E=2048 features of P=49 regions, embed/decoder/attention dims 512,
vocabulary 5000, batch 32, captions of max length 20 (lengths drawn in [10, 20]).

Implementations measured side by side in one run (warm-up, then the median of several
repetitions, interleaved so that machine noise hits all of them alike):

- "tutorial": the per-step formulation of the best-known PyTorch tutorial
  (sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning): sort the batch by length, shrink the
  batch at each step, project the encoder features inside the attention at every step,
  apply the output layer inside the loop. Written out below, same parameters and maths.
- "caption_lib": `DecoderWithAttention` (masking over the padded length, projection once
  per sequence, output layer once after the loop).
- "caption_lib+shrink": caption_lib's decoder driven with sort/shrink (to decide masking
  vs shrinking by measurement).

Prints one JSON object and writes it to benchmarks/results/decoder.json.

    python benchmarks/bench_decoder.py [--reps 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from caption_lib.decoder import DecoderWithAttention, caption_loss

RESULTS = Path(__file__).resolve().parent / "results" / "decoder.json"


def tutorial_forward(dec: DecoderWithAttention, features: torch.Tensor, captions: torch.Tensor,
                     lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
    """The tutorial's loop with `dec`'s weights: sort, shrink, project and classify per step."""
    lengths, order = lengths.sort(descending=True)  # (B,)
    features, captions = features[order], captions[order]  # (B, P, E), (B, L)
    B, P, _ = features.shape
    steps = (lengths - 1).tolist()
    T = max(steps)
    embedded = dec.embedding(captions)  # (B, L, D)
    h, c = dec.init_state(features)  # (B, H)
    predictions = features.new_zeros(B, T, dec.vocab_size)  # (B, T, V)
    alphas = features.new_zeros(B, T, P)  # (B, T, P)
    att = dec.attention
    for t in range(T):
        b = sum(s > t for s in steps)  # captions still running
        att1 = att.encoder_att(features[:b])  # (b, P, A), recomputed every step
        att2 = att.decoder_att(h[:b])  # (b, A)
        e = att.full_att(torch.tanh(att1 + att2.unsqueeze(1))).squeeze(2)  # (b, P)
        alpha = torch.softmax(e, dim=1)  # (b, P)
        context = (features[:b] * alpha.unsqueeze(2)).sum(dim=1)  # (b, E)
        gate = torch.sigmoid(dec.f_beta(h[:b]))  # (b, E)
        h, c = dec.lstm(torch.cat([embedded[:b, t], gate * context], dim=1), (h[:b], c[:b]))
        predictions[:b, t] = dec.fc(dec.dropout(h))  # (b, V), output layer per step
        alphas[:b, t] = alpha
    return predictions, alphas, captions, lengths


def shrink_forward(dec: DecoderWithAttention, features: torch.Tensor, captions: torch.Tensor,
                   lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
    """caption_lib's decoder pieces (projection once, fc once) with sort/shrink."""
    lengths, order = lengths.sort(descending=True)  # (B,)
    features, captions = features[order], captions[order]  # (B, P, E), (B, L)
    B, P, _ = features.shape
    steps = (lengths - 1).tolist()
    T = max(steps)
    embedded = dec.embedding(captions[:, :T])  # (B, T, D)
    h, c = dec.init_state(features)  # (B, H)
    projected = dec.project(features)  # (B, P, A)
    hidden = features.new_zeros(B, T, dec.decoder_dim)  # (B, T, H)
    alphas = features.new_zeros(B, T, P)  # (B, T, P)
    for t in range(T):
        b = sum(s > t for s in steps)
        (h, c), alpha = dec._cell(embedded[:b, t], (h[:b], c[:b]), features[:b], projected[:b])
        hidden[:b, t] = h
        alphas[:b, t] = alpha
    logits = dec.fc(dec.dropout(hidden))  # (B, T, V)
    return logits, alphas, captions, lengths


def tutorial_loss(predictions, alphas, captions, lengths, alpha_c=1.0):
    """Loss over the real tokens (the tutorial packs the sequences; same value)."""
    T = predictions.size(1)
    real = torch.arange(T).unsqueeze(0) < (lengths - 1).unsqueeze(1)  # (B, T)
    xent = F.cross_entropy(predictions[real], captions[:, 1:T + 1][real])
    return xent + alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).sum(dim=1).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--min-len", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    B, P, E, V, L = args.batch, 49, 2048, args.vocab, args.max_len
    features = torch.randn(B, P, E, generator=gen)  # (B, P, E)
    lengths = torch.randint(args.min_len, L + 1, (B,), generator=gen)  # (B,)
    lengths[0] = L
    captions = torch.randint(4, V, (B, L), generator=gen)  # (B, L)
    captions[torch.arange(L).unsqueeze(0) >= lengths.unsqueeze(1)] = 0

    torch.manual_seed(0)
    dec = DecoderWithAttention(V, E, 512, 512, 512, dropout=0.5)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-4)

    def step_caption_lib():
        logits, alphas = dec(features, captions, lengths)
        loss, _ = caption_loss(logits, captions, lengths, alphas)
        return loss

    def step_shrink():
        return tutorial_loss(*shrink_forward(dec, features, captions, lengths))

    def step_tutorial():
        return tutorial_loss(*tutorial_forward(dec, features, captions, lengths))

    impls = {"tutorial": step_tutorial, "caption_lib": step_caption_lib,
             "caption_lib+shrink": step_shrink}
    times: dict[str, list[float]] = {k: [] for k in impls}
    for rep in range(args.warmup + args.reps):
        for name, fn in impls.items():
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            fn().backward()
            opt.step()
            if rep >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1000)

    ms = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "decoder training step (forward + loss + backward + Adam)",
        "sizes": {"batch": B, "regions": P, "encoder_dim": E, "embed_dim": 512,
                  "decoder_dim": 512, "attention_dim": 512, "vocab": V, "max_len": L,
                  "lengths": [int(x) for x in lengths]},
        "threads": args.threads, "reps": args.reps, "warmup": args.warmup,
        "torch": torch.__version__, "machine": platform.machine(),
        "ms_per_step": {k: round(v, 1) for k, v in ms.items()},
        "ms_all": {k: [round(x, 1) for x in v] for k, v in times.items()},
        "ratio_tutorial_over_caption_lib": round(ms["tutorial"] / ms["caption_lib"], 2),
        "ratio_shrink_over_mask": round(ms["caption_lib+shrink"] / ms["caption_lib"], 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
