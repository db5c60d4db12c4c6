"""The feature cache: run the frozen part of the encoder once per image, keep the result.

The encoder's frozen part never changes, so computing it again at every epoch is wasted
work: the first time, `cached_features` runs it over all images (fast path: bf16 autocast
and channels_last on CPU, AMP on CUDA, BatchNorm folded into the convolutions:
`inference_copy`) and stores the output as float16 in a `.npy` file; later epochs and
chapters memory-map that file. What is stored depends on the recipe:

    encoder frozen (the paper, ImageNet weights) -> layer4 output (N, 2048, 7, 7)
    layer4 fine-tuned                            -> layer3 output (N, 1024, 14, 14)
    layer4 from block k fine-tuned ("layer4.k")  -> layer4[k-1] output (N, 2048, 7, 7)

(When training starts inside a stage, the BatchNorm statistics of that stage's frozen
blocks are first calibrated on training images, `calibrate_frozen`: see
`encoder.calibrate_frozen_batchnorm` for why.)

Some caches are finished from another cache rather than from the images, when the
encoder has a `prefix` (the first part of its frozen network, with a cache of its own):
a fine-tuned encoder frozen afterwards (`EncoderCNN.freeze`) finishes its old cache, and
a frozen *random* ResNet-50 finishes the layer3 cache of the offline recipe (which
fine-tunes layer4) by running layer4 alone, when that cache exists. The key then says so
("from"): a cache finished from layer3 and one made from the images (the same values up
to float16 rounding) are two entries, never mistaken for each other.

A cache entry is keyed by everything its content depends on (backbone, weights, where
the frozen part ends (a stage or a block: `EncoderCNN.cached_stage`), image size, the
images themselves by path, size and modification time); another key is
another folder. Extraction writes to a temporary file and renames it when complete, so an
interrupted run never leaves a cache that looks valid.

Data-parallel (under `torchrun`, see `caption_lib.distributed`): each of the N processes
extracts a contiguous block of the images into a cache of its own, rank 0 joins the
blocks into the one cache (same key, same folder as a one-process run would make), and
every process then memory-maps it. The cache folder must be on a file system all
processes see (on a cluster: a shared one, e.g. set CAPTION_LIB_HOME there).

Letters: N images, C channels, h x w the stored grid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from caption_lib import distributed
from caption_lib.encoder import (
    EncoderCNN,
    calibrate_frozen_batchnorm,
    fold_batchnorm,
    image_transform,
)
from caption_lib.errors import CaptionLibError
from caption_lib.runtime import atomic_folder, autocast, workspace_dir

CACHE_VERSION = 2  # 2: fast extraction folds BatchNorm into the convolutions


class _Images(Dataset):
    """Image files -> normalised tensors, in order."""

    def __init__(self, paths: Sequence[Path], image_size: int):
        self.paths = list(paths)
        self.transform = image_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from caption_lib.data import load_image  # the data module owns image reading

        return self.transform(load_image(self.paths[i]))  # (3, S, S)


class FeatureStore:
    """Memory-mapped cached features; `store[idx]` returns a float16 tensor copy."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self.array = np.load(path, mmap_mode="r")  # (N, C, h, w) float16

    def __len__(self) -> int:
        return self.array.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        if isinstance(idx, np.ndarray):
            order = np.argsort(idx)  # sorted reads are faster on a memory map
            out = np.empty((len(idx), *self.array.shape[1:]), dtype=np.float16)
            out[order] = self.array[idx[order]]
            return torch.from_numpy(out)  # (B, C, h, w)
        return torch.from_numpy(np.array(self.array[idx]))  # (C, h, w) or (B, C, h, w)


def calibrate_frozen(encoder: EncoderCNN, paths: Sequence[Path], *, images: int = 256,
                     seed: int = 0, image_size: int = 224, batch_size: int = 32,
                     device: torch.device | str = "cpu", fast: bool = True) -> int:
    """Before caching: BatchNorm statistics for the frozen blocks of a partly trained stage
    (`encoder.calibrate_frozen_batchnorm`) from `images` of `paths`, drawn with `seed`.

    Returns the number of images used; 0 (nothing done) unless training starts inside a
    stage (e.g. fine_tune="layer4.2") and the statistics are not calibrated yet. The cache
    key sees the statistics through `EncoderCNN.frozen_fingerprint`.
    """
    if not encoder.frozen_batchnorms() or encoder.frozen_calibrated:
        return 0
    pick = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:images]
    data = _Images([paths[i] for i in sorted(pick.tolist())], image_size)
    encoder.frozen.to(device)
    batches = (torch.stack([data[j] for j in range(k, min(k + batch_size, len(data)))])
               .to(device) for k in range(0, len(data), batch_size))  # (B, 3, S, S) each
    return calibrate_frozen_batchnorm(encoder, batches, fast=fast)


def cache_key(encoder: EncoderCNN, paths: Sequence[Path], image_size: int,
              via=None) -> dict:
    """Everything the cached values depend on (its hash names the cache folder); `via`:
    the encoder's `prefix` when the values are finished from its cache."""
    files = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as err:
            raise CaptionLibError(f"{p}: image file missing ({err.strerror})") from err
        files.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return {
        "version": CACHE_VERSION,
        "backbone": "resnet50",
        "weights": encoder.cache_name,  # weights_used, or the content of frozen weights
        "stage": encoder.cached_stage,
        "image_size": image_size,
        "frozen_fingerprint": round(encoder.frozen_fingerprint(), 3),
        "images": len(paths),
        "files_sha256": files.hexdigest(),
        # finished from the cache of this stage (`_cached_from_prefix`), not from the images
        **({"from": via.cached_stage} if via is not None else {}),
    }


CPU_PIXELS = 8 * 224 * 224  # input pixels per forward pass on a CPU (see `extract_frozen`)


def cpu_piece(height: int, width: int) -> int:
    """Inputs of height x width per forward pass on a CPU: as many as hold `CPU_PIXELS`."""
    return max(1, CPU_PIXELS // (height * width))


@torch.no_grad()
def extract_frozen(frozen: nn.Module, images: torch.Tensor, fast: bool = True,
                   piece: int | None = None) -> torch.Tensor:
    """Run a frozen part (an encoder's `.frozen`, or its `fold_batchnorm` copy) on one
    batch: (B, C, S, S) images or cached maps -> (B, C', h, w), fp32 result.

    `fast`: bf16 autocast + channels_last on CPU (several times faster than fp32:
    `benchmarks/results/encoder.json`; cosine similarity to fp32 above 0.999, which
    tests/test_features.py checks), autocast on CUDA. On a CPU the batch runs `piece`
    inputs at a time, by default `cpu_piece` (as many as hold `CPU_PIXELS`): 8 images of
    224x224, whose activations at layer1 (8, 256, 56, 56) stay nearer the caches than
    32 images' (tens of MB); a cached 14x14 map runs whole (in pieces of 8 it ran
    slower: its products are small already). `benchmarks/bench_encoder.py` measures
    images both ways.
    """
    device = images.device
    if fast:
        images = images.contiguous(memory_format=torch.channels_last)
    piece = piece or cpu_piece(images.size(-2), images.size(-1))
    pieces = images.split(piece) if device.type == "cpu" else (images,)
    with autocast(device, "auto" if fast else "fp32"):
        out = torch.cat([frozen(part) for part in pieces])  # (B, C', h, w)
    return out.float().contiguous()


def inference_copy(frozen: nn.Module, fast: bool) -> nn.Module:
    """What extraction runs: with `fast`, a copy of `frozen` with its BatchNorm layers
    folded into the convolutions (`encoder.fold_batchnorm`); else `frozen` itself."""
    return fold_batchnorm(frozen) if fast else frozen


def cached_features(encoder: EncoderCNN, paths: Sequence[Path], *, cache_root: Path,
                    image_size: int = 224, batch_size: int = 32, device: torch.device | str = "cpu",
                    fast: bool = True, num_workers: int = 0, progress: bool = True,
                    shard: bool = True) -> FeatureStore:
    """The frozen encoder's output for every image in `paths`, computed once and cached.

    Returns a `FeatureStore` whose row i belongs to `paths[i]`. A cache hit costs a
    memory map; a miss runs the frozen encoder with a progress bar. `shard`: under
    torchrun, split the extraction across the processes (see the module docstring).
    """
    device = torch.device(device)
    prefix = _prefix_to_finish(encoder, paths, image_size, Path(cache_root))
    folder, key, store = _lookup(encoder, paths, image_size, Path(cache_root), prefix)
    if shard and distributed.world_size() > 1 and not _all_hit(store):
        store = None  # every process takes the miss path and its barriers (`_all_hit`)
    if store is not None:
        return store
    data = folder / "features.npy"
    if prefix is not None:  # finish the prefix's cache (see the module docstring)
        return _cached_from_prefix(encoder, prefix, list(paths), folder, key,
                                   cache_root=Path(cache_root), image_size=image_size,
                                   batch_size=batch_size, device=device, fast=fast,
                                   num_workers=num_workers, progress=progress, shard=shard)
    if shard and distributed.world_size() > 1:  # data-parallel: each rank extracts a block
        return _cached_sharded(encoder, list(paths), folder, key, cache_root=Path(cache_root),
                               image_size=image_size, batch_size=batch_size, device=device,
                               fast=fast, num_workers=num_workers, progress=progress)
    with atomic_folder(folder) as tmp:  # an interrupted run leaves no valid-looking cache
        shape, seconds = _extract_into(tmp / "features.npy", encoder, paths, key, device=device,
                                       image_size=image_size, batch_size=batch_size, fast=fast,
                                       num_workers=num_workers, progress=progress)
        meta = {"key": key, "shape": list(shape), "dtype": "float16",
                "seconds": round(seconds, 1), "images_per_s": round(len(paths) / seconds, 1),
                "device": str(device), "fast": fast}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return FeatureStore(data, meta)


def _all_hit(store: FeatureStore | None) -> bool:
    """Data-parallel: whether every process found the cache. They must agree: rank 0
    finishes a prefix's cache alone while the others wait at a barrier
    (`_cached_from_prefix`), and a process that looked after rank 0 had finished would
    find the cache, skip that barrier and meet rank 0 at the next one (the next split's),
    before that split's cache exists."""
    return distributed.all_reduce_sum([store is None])[0] == 0


def _lookup(encoder, paths: Sequence[Path], image_size: int, cache_root: Path, via=None
            ) -> tuple[Path, dict, FeatureStore | None]:
    """The cache folder of `encoder`'s output, its key, and the store when complete."""
    key = cache_key(encoder, paths, image_size, via)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root / f"{key['backbone']}-{key['stage']}-{digest}"
    data, meta_path = folder / "features.npy", folder / "meta.json"
    if meta_path.is_file() and data.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return folder, key, FeatureStore(data, meta)
    return folder, key, None


def _prefix_to_finish(encoder, paths: Sequence[Path], image_size: int, cache_root: Path):
    """The `prefix` whose cache `encoder`'s is finished from, or None (from the images).
    A frozen fine-tuned encoder's, always; a frozen random encoder's (`optional`) only
    when that layer3 cache exists already (the offline recipe's), so that a run without
    one (chapter 5's random-weights comparison on Colab) does not write a large one."""
    prefix = getattr(encoder, "prefix", None)
    if prefix is None or not prefix.optional:
        return prefix
    return prefix if _lookup(prefix, paths, image_size, cache_root)[2] is not None else None


def workspace_features(encoder: EncoderCNN, records: Sequence, device: torch.device | str = "cpu",
                       progress: bool = True) -> FeatureStore:
    """`cached_features` of the images of `records` (anything with `.image`), in the
    workspace's cache (`runtime.workspace_dir() / "features"`): the one the trainer,
    `evaluate` and the chapters share."""
    return cached_features(encoder, [r.image for r in records],
                           cache_root=workspace_dir() / "features", device=device,
                           progress=progress)


def _extract_into(path: Path, encoder: EncoderCNN, paths: Sequence[Path], key: dict, *,
                  device: torch.device, image_size: int, batch_size: int, fast: bool,
                  num_workers: int, progress: bool) -> tuple[tuple[int, ...], float]:
    """Run the frozen part over `paths` into the float16 `.npy` file `path` (N, C, h, w);
    returns (shape, seconds). The frozen part goes back to its device even on failure."""
    encoder_was_on = next(encoder.parameters()).device
    loader = DataLoader(_Images(paths, image_size), batch_size=batch_size,
                        num_workers=num_workers)
    out, row, start = None, 0, time.perf_counter()
    bar = tqdm(total=len(paths), desc=f"caching {key['stage']} features", unit="img",
               disable=not progress, mininterval=1.0)
    try:
        encoder.frozen.to(device)
        frozen = inference_copy(encoder.frozen, fast)
        # iterating a DataLoader draws a seed from the global RNG: fork it, so that a miss
        # leaves the caller's random stream as a hit does (a training run must not depend
        # on whether the cache existed)
        with torch.random.fork_rng(devices=[]):
            for images in loader:
                feats = extract_frozen(frozen, images.to(device), fast=fast)  # (B, C, h, w)
                if out is None:
                    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                                    shape=(len(paths), *feats.shape[1:]))
                out[row:row + len(feats)] = feats.cpu().numpy().astype(np.float16)
                row += len(feats)
                bar.update(len(feats))
    finally:
        bar.close()
        encoder.frozen.to(encoder_was_on)
    if out is None:
        raise CaptionLibError("no images to cache features for")
    out.flush()
    shape = tuple(out.shape)
    del out
    return shape, time.perf_counter() - start


@torch.no_grad()
def _cached_from_prefix(encoder: EncoderCNN, prefix, paths: list[Path], folder: Path,
                        key: dict, *, cache_root: Path, **options) -> FeatureStore:
    """The full frozen output from the cache of the encoder's old frozen part (`freeze`):
    only the stages after it run (e.g. a frozen fine-tuned layer4 on cached layer3).
    Data-parallel (`shard`): the processes share the prefix's cache (sharded as usual
    when missing); rank 0 finishes it and the others wait, then open it."""
    base = cached_features(prefix, paths, cache_root=cache_root, **options)
    if options.pop("shard") and distributed.world_size() > 1:
        if distributed.rank() == 0:
            _cached_from_prefix(encoder, prefix, paths, folder, key, cache_root=cache_root,
                                shard=False, **options)
        distributed.barrier()
        return FeatureStore(folder / "features.npy",
                            json.loads((folder / "meta.json").read_text()))
    device, fast = torch.device(options["device"]), options["fast"]
    suffix = encoder.frozen[prefix.size:]
    was_on = next(encoder.parameters()).device
    suffix.to(device)
    run = inference_copy(suffix, fast)
    try:
        with atomic_folder(folder) as tmp:
            start, out = time.perf_counter(), None
            rows = tqdm(range(0, len(base), options["batch_size"]), unit="batch",
                        desc=f"caching {key['stage']} features from {prefix.cached_stage}",
                        disable=not options["progress"], mininterval=1.0)
            for row in rows:
                x = base[row:row + options["batch_size"]].to(device, torch.float32)  # (B, C, h, w)
                feats = extract_frozen(run, x, fast)  # (B, C', h', w')
                if out is None:
                    shape = (len(paths), *feats.shape[1:])
                    out = np.lib.format.open_memmap(tmp / "features.npy", mode="w+",
                                                    dtype=np.float16, shape=shape)
                out[row:row + len(feats)] = feats.cpu().numpy().astype(np.float16)
            out.flush()
            del out
            seconds = time.perf_counter() - start
            meta = {"key": key, "shape": list(shape), "dtype": "float16", "from": str(base.path),
                    "seconds": round(seconds, 1), "device": str(device), "fast": fast}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    finally:
        suffix.to(was_on)
    return FeatureStore(folder / "features.npy", meta)


def _cached_sharded(encoder: EncoderCNN, paths: list[Path], folder: Path, key: dict, *,
                    cache_root: Path, **options) -> FeatureStore:
    """Data-parallel miss: rank r caches `paths[block r]` under `.shards/`, rank 0 joins
    the blocks (N, C, h, w) into `folder`, every rank then opens the joined cache."""
    rank, world = distributed.rank(), distributed.world_size()
    part = distributed.block(len(paths), rank, world)
    mine = None
    if len(part):
        mine = cached_features(encoder, paths[part.start:part.stop], shard=False,
                               cache_root=cache_root / ".shards", **options).path
    blocks = distributed.all_gather_object(None if mine is None else str(mine))
    if rank == 0:
        with atomic_folder(folder) as tmp:
            stores = [FeatureStore(Path(b), {}) for b in blocks if b is not None]
            shape = (len(paths), *stores[0].shape[1:])
            out = np.lib.format.open_memmap(tmp / "features.npy", mode="w+",
                                            dtype=np.float16, shape=shape)
            row = 0
            for store in stores:
                out[row:row + len(store)] = store.array
                row += len(store)
            out.flush()
            del out
            meta = {"key": key, "shape": list(shape), "dtype": "float16", "shards": world,
                    "device": str(options.get("device")), "fast": options.get("fast")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for b in blocks:  # the blocks are not needed any more
            if b is not None:
                shutil.rmtree(Path(b).parent, ignore_errors=True)
    distributed.barrier()
    data, meta_path = folder / "features.npy", folder / "meta.json"
    return FeatureStore(data, json.loads(meta_path.read_text()))
