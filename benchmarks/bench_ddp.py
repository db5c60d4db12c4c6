"""Benchmark: one data-parallel training step at COCO's sizes, 1 process vs N processes.

The step of `caption_lib.train` for the paper's COCO setting: frozen encoder, so the
cached layer4 output (B, 2048, 7, 7) goes straight to the decoder (512/512/512, a
vocabulary of V = 10,000 words, about COCO's with min_freq 5), 5 captions of 14 tokens
per image; loss normalised by the global token count; DDP averages the gradients (21.0 M
parameters: 84 MB of fp32 gradients all-reduced every step); gradient clipping; Adam.
The same global batch of images is timed with 1 process and with N processes (each 1/N).

On the CPU (default) the processes use the Gloo backend and one thread each; with
`--device cuda` one GPU per process and NCCL (then N <= number of GPUs). Results (median
seconds per step, captions/s, the scaling efficiency) go to
benchmarks/results/ddp_<device>_b<images>.json.

    python benchmarks/bench_ddp.py [--images 8] [--procs 2] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CAPTIONS_PER_IMAGE, LENGTH, VOCAB = 5, 14, 10_000


def _step_times(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    from caption_lib.decoder import DecoderWithAttention, caption_loss

    torch.manual_seed(0)
    decoder = DecoderWithAttention(VOCAB, 2048, 512, 512, 512, dropout=0.5).to(device).train()
    model = (DistributedDataParallel(decoder, device_ids=[rank] if cuda else None)
             if world > 1 else decoder)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=4e-4)
    images = args.images // world  # this process's share of the global batch
    n = images * CAPTIONS_PER_IMAGE
    g = torch.Generator().manual_seed(rank)
    cached = torch.randn(images, 2048, 7, 7, generator=g).half()  # (B, 2048, 7, 7) as stored
    captions = torch.randint(4, VOCAB, (n, LENGTH), generator=g)  # (N, L)
    lengths = torch.full((n,), LENGTH)  # (N,)
    owner = torch.arange(images).repeat_interleave(CAPTIONS_PER_IMAGE)  # (N,)
    # every process holds an equal share of the global batch: its loss weights
    # (`distributed.split_batch`) are 1, so the plain mean loss gives DDP's gradient

    def step() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        x = cached.to(device, torch.float32)  # (B, 2048, 7, 7)
        feats = x.flatten(2).transpose(1, 2)[owner.to(device)]  # (N, 49, 2048)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits, alphas = model(feats, captions.to(device), lengths.to(device))
            loss, _ = caption_loss(logits.float(), captions.to(device), lengths.to(device),
                                   alphas.float(), alpha_c=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients here
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    step()  # warm-up
    times = [step() for _ in range(args.repeats)]
    if world > 1:  # a step lasts as long as its slowest process
        gathered = [None] * world
        dist.all_gather_object(gathered, times)
        times = [max(t) for t in zip(*gathered)]
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(times))


def _run(world: int, args: argparse.Namespace, out: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_step_times, args=(world, port, args, str(out)), nprocs=world, join=True)
    return statistics.median(json.loads(out.read_text()))


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="global batch (images)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.images % args.procs:
        parser.error(f"--images {args.images} is not a multiple of --procs {args.procs}")
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    scratch = results / ".bench_ddp_times.json"
    load_before = os.getloadavg()[0]  # other work on the machine slows both runs
    seconds = {1: _run(1, args, scratch), args.procs: _run(args.procs, args, scratch)}
    scratch.unlink()
    captions = args.images * CAPTIONS_PER_IMAGE
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    result = {
        "benchmark": f"one DDP training step at COCO sizes, 1 vs {args.procs} processes "
                     f"({'NCCL' if args.device == 'cuda' else 'Gloo'})",
        "threads": args.threads if args.device == "cpu" else None,
        "device": name,
        "threads_per_process": args.threads if args.device == "cpu" else None,
        "global_batch_images": args.images,
        "global_batch_captions": captions,
        "decoder": "512/512/512, V=10000, L=14, frozen encoder (cached 2048x7x7)",
        "seconds_per_step_median": {str(k): round(v, 3) for k, v in seconds.items()},
        "captions_per_s": {str(k): round(captions / v, 1) for k, v in seconds.items()},
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "speedup": round(seconds[1] / seconds[args.procs], 2),
        "scaling_efficiency": round(seconds[1] / seconds[args.procs] / args.procs, 2),
        "command": f"python benchmarks/bench_ddp.py --images {args.images} --procs "
                   f"{args.procs} --repeats {args.repeats} --threads {args.threads} "
                   f"--device {args.device}",
    }
    (results / f"ddp_{args.device}_b{args.images}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
