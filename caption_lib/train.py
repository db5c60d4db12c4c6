"""Training: teacher forcing on cached features, validation by real decoding, exact resume.

One epoch shows every training image once, in batches of `batch_size` images, each with
all its reference captions (or `captions_per_image` of them, drawn at random): the
encoder stage runs once per image and its captions share the result. The frozen part of
the encoder never runs during training: its output comes from the feature cache
(`caption_lib.features`). When a stage of the encoder is fine-tuned (the offline default: `layer4` of a random-init
ResNet-50), it runs on the cached `layer3` output in train mode, and its BatchNorm
statistics are re-estimated over training images before every validation
(`encoder.recalibrate_batchnorm`).

After each epoch: validation loss (teacher forcing), validation BLEU-4 from greedy
decoding (no teacher forcing, special tokens stripped), the learning rate schedule and
early stopping (both count epochs without progress: neither a better BLEU-4 nor a lower
loss), and two checkpoints written atomically: `last.pt` (to resume)
and `best.pt` (best validation BLEU-4). Resuming restores model, optimiser, schedule,
history and the random number generator, so the run continues exactly as if it had not
stopped (on the same machine and device).

Data-parallel (`torchrun --nproc_per_node=N`, see `caption_lib.distributed`): the same
code runs in N processes. `batch_size` stays the *global* batch (images per optimiser
step): every process draws the same shuffled epoch order (seeded by seed and epoch, as
`DistributedSampler` does) and takes every N-th image of each batch; the loss of each
process is normalised by the global token and caption counts, so the gradient DDP
averages is the one-process gradient of the same batch. Only rank 0 logs, shows progress
and writes checkpoints; validation images are split across processes and the generated
captions gathered, so every image is scored exactly once.

Letters: B images in a batch, N captions in a batch, C/h/w cached channels and grid,
P regions, E encoder dim, L caption length.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from caption_lib import distributed
from caption_lib.data import Record, load_dataset, pad_captions, split_records
from caption_lib.decoder import caption_loss
from caption_lib.decoding import greedy_decode
from caption_lib.encoder import recalibrate_batchnorm
from caption_lib.errors import CaptionLibError
from caption_lib.features import FeatureStore, cached_features
from caption_lib.metrics import bleu, semantic_f1
from caption_lib.model import Captioner, CaptionerConfig
from caption_lib.runtime import pick_device, seed_everything, workspace_dir
from caption_lib.vocab import Vocabulary, tokenize


@dataclass
class TrainConfig:
    """How to train (the model's own hyper-parameters are in `CaptionerConfig`)."""

    epochs: int = 6
    batch_size: int = 32  # images (each brings its captions)
    lr: float = 4e-4  # decoder, Adam
    encoder_lr: float = 1e-4  # the fine-tuned encoder stage, if any
    grad_clip: float = 5.0
    schedule: str = "plateau"  # "plateau": lr_factor after lr_patience stale epochs;
    #                            "cosine": decay every step from lr to 0 over all epochs
    lr_factor: float = 0.5  # multiply the learning rates by this ...
    lr_patience: int = 1  # ... after this many epochs without progress (see `_progress`)
    early_stop: int = 3  # stop after this many epochs without progress
    min_freq: int = 5  # words seen fewer times in training captions become <unk>
    captions_per_image: int = 0  # per image and epoch, in its batch; 0 = all references
    max_caption_len: int = 40  # tokens incl. <start>/<end>; longer ones are cut
    max_decode_len: int = 20
    val_images: int = 300  # images decoded for val BLEU-4 (0 = all)
    bn_images: int = 1024  # training images used to re-estimate BatchNorm statistics
    precision: str = "auto"  # "fp32", "bf16" or "auto" (bf16 encoder stage on CPU, AMP on CUDA)
    seed: int = 0
    restval: str = "train"  # COCO's Karpathy "restval" images: "train" (customary) or "drop"

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    model: Captioner
    history: list[dict] = field(default_factory=list)
    out_dir: Path | None = None


class _Split:
    """A split's cached features and its captions, encoded once."""

    def __init__(self, records: list[Record], features: FeatureStore, vocab: Vocabulary,
                 max_len: int):
        self.records = records
        self.features = features
        encoded = [[vocab.encode(c)[:max_len] for c in r.captions] for r in records]
        for caps in encoded:  # a cut caption still ends with <end>
            for ids in caps:
                ids[-1] = vocab.end_id if len(ids) == max_len else ids[-1]
        self.encoded = encoded
        self.pad_id = vocab.pad_id

    def epoch_batches(self, batch_size: int, per_image: int,
                      generator: torch.Generator) -> list[list[tuple[int, int]]]:
        """One epoch: images shuffled into batches of `batch_size`; each image brings
        `per_image` of its captions drawn at random (0: all of them)."""
        order = torch.randperm(len(self.encoded), generator=generator).tolist()
        batches = []
        for k in range(0, len(order), batch_size):
            pairs = []
            for i in order[k:k + batch_size]:
                n = len(self.encoded[i])
                pick = torch.randperm(n, generator=generator)[:per_image or n].tolist()
                pairs += [(i, j) for j in pick]
            batches.append(pairs)
        return batches

    def batch(self, pairs: list[tuple[int, int]]):
        """(image, caption) pairs -> cached features of the distinct images (B, C, h, w)
        fp16, captions (N, L) int64, lengths (N,), owner (N,): the row of each caption's
        image in the features."""
        images = sorted({i for i, _ in pairs})
        row = {i: r for r, i in enumerate(images)}
        captions, lengths = pad_captions([self.encoded[i][j] for i, j in pairs],
                                         self.pad_id)  # (N, L), (N,)
        owner = torch.tensor([row[i] for i, _ in pairs])  # (N,)
        return self.features[torch.tensor(images)], captions, lengths, owner


def _autocast(device: torch.device, precision: str):
    """Mixed precision for the encoder stage (and on CUDA the decoder too)."""
    if precision == "fp32":
        return nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def regions(model: Captioner, cached: torch.Tensor, device: torch.device,
            precision: str = "auto", stage: nn.Module | None = None) -> torch.Tensor:
    """Cached frozen output (B, C, h, w) -> region features (B, P, E) in fp32.

    `stage`: what runs the trained encoder stage (data-parallel: its DDP wrapper);
    default `model.encoder.forward_cached`."""
    x = cached.to(device, torch.float32, non_blocking=True)
    if model.encoder.trained_stages:
        x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, precision):
            return (stage or model.encoder.forward_cached)(x).float()  # (B, P, E)
    return model.encoder.forward_cached(x)  # (B, 49, 2048)


def _features_for(model: Captioner, records: list[Record], device: torch.device,
                  progress: bool) -> FeatureStore:
    return cached_features(model.encoder, [r.image for r in records],
                           cache_root=workspace_dir() / "features", device=device,
                           progress=progress)


@torch.no_grad()
def evaluate_split(model: Captioner, split: _Split, device: torch.device, config: TrainConfig,
                   limit: int = 0, batch_size: int = 64) -> dict:
    """Teacher-forced cross-entropy (first reference) and greedy-decoding BLEU / semantic F1."""
    model.eval()
    n = len(split.records) if limit <= 0 else min(limit, len(split.records))
    losses, hyps, refs, objects = [], [], [], []
    # data-parallel: this process decodes every world-th image (all of them for one)
    mine = distributed.shard(range(n), distributed.rank(), distributed.world_size())
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        cached, captions, lengths, _ = split.batch([(i, 0) for i in idx])
        feats = regions(model, cached, device, config.precision)  # (B, P, E)
        logits, alphas = model.decoder(feats, captions.to(device), lengths.to(device))
        _, parts = caption_loss(logits, captions.to(device), lengths.to(device), alphas,
                                alpha_c=model.config.alpha_c)
        losses.append(parts["xent"] * len(idx))
        result = greedy_decode(model.decoder, feats, model.vocab.start_id, model.vocab.end_id,
                               max_len=config.max_decode_len)
        hyps += [[model.vocab.itos[t] for t in toks] for toks in result.tokens]
        refs += [[tokenize(c) for c in split.records[i].captions] for i in idx]
        objects += [split.records[i].objects for i in idx]
    if distributed.world_size() > 1:  # gather every process's captions, each image once
        parts = distributed.all_gather_object(dict(zip(mine, zip(hyps, refs, objects))))
        hyps, refs, objects = map(list, zip(*distributed.merge_by_index(parts, n)))
        losses = distributed.all_reduce_sum([sum(losses)])
    scores = {"loss": sum(losses) / n, **bleu(refs, hyps)}
    if all(o is not None for o in objects):
        scores["semantic_f1"] = semantic_f1(hyps, objects)
    return scores


def _recalibrate(model: Captioner, split: _Split, device: torch.device, config: TrainConfig,
                 epoch: int) -> None:
    g = torch.Generator().manual_seed(config.seed * 1000 + epoch + 500)
    idx = torch.randperm(len(split.records), generator=g)[:config.bn_images]
    batches = (split.features[idx[k:k + 64]] for k in range(0, len(idx), 64))
    with _autocast(device, config.precision) if device.type == "cuda" else nullcontext():
        recalibrate_batchnorm(model.encoder, batches, device)


def _optimizer(model: Captioner, config: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(model.decoder.parameters()), "lr": config.lr}]
    trainable = [p for p in model.encoder.trainable.parameters() if p.requires_grad]
    if trainable:
        groups.append({"params": trainable, "lr": config.encoder_lr})
    return torch.optim.Adam(groups)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """The learning-rate schedule: on progress (`_progress`, stepped per epoch) or cosine
    (per step)."""
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=config.lr_factor, patience=config.lr_patience)
    if config.schedule == "cosine":
        total = max(1, config.epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    raise CaptionLibError(f"unknown schedule {config.schedule!r} (use plateau or cosine)")


def train(data_dir: str | Path, out_dir: str | Path, model_config: CaptionerConfig | None = None,
          config: TrainConfig | None = None, device: str | torch.device = "auto",
          resume: bool = False, progress: bool = True, log=print) -> TrainResult:
    """Train a `Captioner` on the data set in `data_dir`; checkpoints go to `out_dir`.

    `data_dir`: a folder written by `make_shapes` or a real data set folder (see
    `caption_lib.data.load_dataset`). With `resume=True` and `out_dir/last.pt` present,
    training continues from it: the configs stored in the checkpoint win, except the
    number of epochs, which `config` may raise.

    Under `torchrun` (WORLD_SIZE > 1) this joins the process group and trains data-parallel
    (see the module docstring); `log` and `progress` then only act on rank 0.
    """
    device = pick_device(str(device)) if not isinstance(device, torch.device) else device
    # -- data-parallel: one process per device; only rank 0 talks and writes -------------
    device = distributed.local_device(device)
    created_group = distributed.setup(device)
    rank, world = distributed.rank(), distributed.world_size()
    if rank != 0:
        log, progress = (lambda *_: None), False
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last, best = out_dir / "last.pt", out_dir / "best.pt"
    records = load_dataset(data_dir, restval_to_train=False)  # restval: see TrainConfig.restval
    train_records, val_records = split_records(records, "train"), split_records(records, "val")
    if not (train_records or split_records(records, "restval")) or not val_records:
        raise CaptionLibError(f"{data_dir}: need a train and a val split "
                              f"(found {len(train_records)} train, {len(val_records)} val images)")

    extra: dict = {}
    if resume and last.is_file():
        model = Captioner.load(last, map_location=device)
        extra = model.extra
        epochs = config.epochs if config is not None else None
        config = TrainConfig.from_dict(json.loads(extra["train_config"]))
        config.epochs = epochs or config.epochs  # the only setting a resume may change
        train_records = _train_records(records, config.restval)
        log(f"resuming from {last} after epoch {extra['epoch']}")
    else:
        config = config or TrainConfig()
        model_config = model_config or CaptionerConfig()
        train_records = _train_records(records, config.restval)
        seed_everything(config.seed)
        vocab = Vocabulary.build([c for r in train_records for c in r.captions],
                                 min_freq=config.min_freq)
        model = Captioner(vocab, model_config)
    model.to(device)
    log(f"encoder weights: {model.encoder.weights_used}; trained encoder stages: "
        f"{', '.join(model.encoder.trained_stages) or 'none (frozen)'}; device: {device}")

    train_split = _Split(train_records, _features_for(model, train_records, device, progress),
                         model.vocab, config.max_caption_len)
    val_split = _Split(val_records, _features_for(model, val_records, device, progress),
                       model.vocab, config.max_caption_len)

    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_records) / config.batch_size)
    scheduler = _scheduler(optimizer, config, steps_per_epoch)
    history: list[dict] = []
    first_epoch = 1
    if extra:
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        history = json.loads(extra["history"])
        first_epoch = int(extra["epoch"]) + 1
        torch.set_rng_state(extra["rng"])
    # data-parallel: each rank its own dropout stream (rank 0 keeps the one-process one)
    if world > 1 and extra.get("rng_ranks") is not None and len(extra["rng_ranks"]) == world:
        torch.set_rng_state(extra["rng_ranks"][rank])
    elif rank > 0:
        torch.manual_seed(config.seed * 1000 + 7919 * rank + first_epoch)
    decoder, stage = _data_parallel(model, device, world)

    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda"
                                  and config.precision != "fp32"
                                  and not torch.cuda.is_bf16_supported())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for epoch in range(first_epoch, config.epochs + 1):
        if _stale(history, config):
            log(f"early stop: no better val BLEU-4 or val loss in {config.early_stop} epochs")
            break
        start = time.perf_counter()
        model.train()
        g = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        batches = train_split.epoch_batches(config.batch_size, config.captions_per_image, g)
        total = tokens = 0.0
        seen = 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                   disable=not progress, mininterval=2.0)
        for batch in bar:
            mine, norms, weight = _rank_share(train_split, batch, rank, world)  # data-parallel
            cached, captions, lengths, owner = train_split.batch(mine)
            captions, lengths = captions.to(device), lengths.to(device)
            # the encoder stage runs once per image; its captions share the result
            feats = regions(model, cached, device, config.precision,
                            stage)[owner.to(device)]  # (N, P, E)
            seen += len(batch)
            cuda_amp = _autocast(device, config.precision) if device.type == "cuda" else nullcontext()
            with cuda_amp:
                logits, alphas = decoder(feats, captions, lengths)  # (B, L-1, V), (B, L-1, P)
                loss, parts = caption_loss(logits.float(), captions, lengths, alphas.float(),
                                           alpha_c=model.config.alpha_c, normalizers=norms)
                loss = loss * weight  # 0 only for a rank with no image in this batch
            if not _finite(parts["xent"]):
                raise CaptionLibError(f"training diverged (loss {parts['xent']}) in epoch "
                                      f"{epoch}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if config.schedule == "cosine":
                scheduler.step()
            total += parts["xent"] * parts["tokens"] * weight
            tokens += parts["tokens"] * weight
            bar.set_postfix(loss=f"{parts['xent']:.3f}", refresh=False)
        bar.close()
        if world > 1:  # data-parallel: the epoch's loss over all processes' tokens
            total, tokens = distributed.all_reduce_sum([total, tokens])
        train_seconds = time.perf_counter() - start
        if model.encoder.trained_stages:
            _recalibrate(model, train_split, device, config, epoch)
        val = evaluate_split(model, val_split, device, config, limit=config.val_images)
        if config.schedule == "plateau":  # patience: epochs without progress
            scheduler.step(_progress(history + [{"val_bleu4": val["bleu4"],
                                                 "val_loss": val["loss"]}]))
        entry = {"epoch": epoch, "train_loss": total / max(tokens, 1.0), "val_loss": val["loss"],
                 "val_bleu4": val["bleu4"], "lr": optimizer.param_groups[0]["lr"],
                 "train_seconds": round(train_seconds, 1),
                 "seconds": round(time.perf_counter() - start, 1),
                 "captions_per_s": round(seen / train_seconds, 1)}
        if "semantic_f1" in val:
            entry["val_semantic_f1"] = val["semantic_f1"]
        history.append(entry)
        log(_format(entry))
        is_best = val["bleu4"] >= max(h["val_bleu4"] for h in history)
        state = {"epoch": epoch, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "history": json.dumps(history),
                 "rng": torch.get_rng_state(), "train_config": json.dumps(asdict(config)),
                 "data_dir": str(Path(data_dir).resolve())}
        if world > 1:  # data-parallel: every rank's RNG, so that a resume is exact
            state["rng_ranks"] = distributed.all_gather_object(torch.get_rng_state())
            state["world_size"] = world
        if rank == 0:  # data-parallel: one process writes
            model.save(last, extra=state)
            if is_best:
                model.save(best, extra=state)
        distributed.barrier()
    distributed.cleanup(created_group)
    return TrainResult(model=model, history=history, out_dir=out_dir)


# -- data-parallel helpers (one process: no-ops) ----------------------------------------

class _EncoderStage(nn.Module):
    """The trained encoder stage as a module DDP can wrap: cached (B, C, h, w) -> (B, P, E)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_cached(x)  # (B, P, E)


def _data_parallel(model: Captioner, device: torch.device, world: int):
    """(decoder, encoder stage) to train with: DDP wrappers sharing the model's weights
    when `world` > 1, else the decoder itself and None (`regions`' default)."""
    if world == 1:
        return model.decoder, None
    ids = [device.index] if device.type == "cuda" else None
    decoder = DistributedDataParallel(model.decoder, device_ids=ids,
                                      find_unused_parameters=not model.config.use_attention)
    stage = None
    if model.encoder.trained_stages:
        # BatchNorm buffers are not synced at each forward: the statistics are re-estimated
        # identically on every rank before each validation (`_recalibrate`). The stage
        # runs on channels_last input, so its conv weights (and gradients) are made
        # channels_last too: DDP's gradient buckets then match the gradients' strides
        model.encoder.trainable.to(memory_format=torch.channels_last)
        stage = DistributedDataParallel(_EncoderStage(model.encoder), device_ids=ids,
                                        forward_sync_buffers=False)
    return decoder, stage


def _rank_share(split: _Split, batch: list[tuple[int, int]], rank: int, world: int):
    """This rank's part of a global batch of (image, caption) pairs.

    Returns (pairs, normalizers, weight): every `world`-th image of the batch with its
    captions; `caption_loss` normalizers (global tokens / world, global captions / world);
    weight 1, or 0 when this rank has no image in the batch (it then runs the first pair
    with a zero loss, so that every rank still takes part in the gradient all-reduce).
    """
    if world == 1:
        return batch, None, 1.0
    images = list(dict.fromkeys(i for i, _ in batch))  # the batch's images, in order
    own = set(images[rank::world])
    mine = [(i, j) for i, j in batch if i in own]
    tokens = sum(len(split.encoded[i][j]) - 1 for i, j in batch)  # targets: all but <start>
    norms = (tokens / world, len(batch) / world)
    return (mine, norms, 1.0) if mine else (batch[:1], norms, 0.0)


def _train_records(records: list[Record], restval: str) -> list[Record]:
    """The training images: split "train", plus COCO's "restval" when `restval` is "train"
    (Karpathy's split: 82,783 + 30,504 = 113,287 images) or without them ("drop")."""
    if restval not in ("train", "drop"):
        raise CaptionLibError(f"restval={restval!r}: use 'train' or 'drop'")
    keep = {"train", "restval"} if restval == "train" else {"train"}
    return [r for r in records if r.split in keep]


def _progress(history: list[dict]) -> int:
    """The number of epochs that made progress: a better val BLEU-4 or a lower val loss
    than every epoch before. It rises exactly when an epoch makes progress, so the plateau
    schedule (mode "max") and early stopping count epochs without progress. The loss
    counts too because on a small data set BLEU-4 stays 0 for the first epochs (no
    caption has a right 4-gram yet) while the model is learning: BLEU-4 alone ended such
    runs after 4 epochs."""
    count, bleu, loss = 0, -math.inf, math.inf
    for h in history:
        if h["val_bleu4"] > bleu or h["val_loss"] < loss:
            count += 1
        bleu, loss = max(bleu, h["val_bleu4"]), min(loss, h["val_loss"])
    return count


def _stale(history: list[dict], config: TrainConfig) -> bool:
    """True after `early_stop` epochs in a row without progress (see `_progress`)."""
    if len(history) <= config.early_stop:
        return False
    return _progress(history) == _progress(history[:-config.early_stop])


def _format(entry: dict) -> str:
    text = (f"epoch {entry['epoch']}: train loss {entry['train_loss']:.3f}, "
            f"val loss {entry['val_loss']:.3f}, val BLEU-4 {entry['val_bleu4']:.1f}")
    if "val_semantic_f1" in entry:
        text += f", val semantic F1 {entry['val_semantic_f1']:.3f}"
    return text + f", {entry['seconds']:.0f} s"


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


def run_dir_for(data_dir: str | Path, model_config: CaptionerConfig, config: TrainConfig) -> Path:
    """The run folder of a (data, configs) combination: another setting, another folder."""
    settings = asdict(config)
    if settings.get("restval") == "train":  # added later: at its default, older runs' folder
        del settings["restval"]
    key = json.dumps([str(Path(data_dir).resolve()), asdict(model_config), settings],
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return workspace_dir() / "runs" / f"{Path(data_dir).name}-{digest}"


def ensure_trained(data_dir: str | Path, model_config: CaptionerConfig, config: TrainConfig,
                   device: str | torch.device = "auto", progress: bool = True,
                   log=print) -> TrainResult:
    """Train once and reuse: a finished run of the same settings is loaded, not redone.

    An interrupted run continues where it stopped (`resume`). Chapters use this so that
    each can run on its own, and the next one finds the model the previous one trained.
    """
    return train(data_dir, run_dir_for(data_dir, model_config, config), model_config, config,
                 device=device, resume=True, progress=progress, log=log)


RECIPE_ENV = "CAPTION_LIB_RECIPE_OVERRIDES"


def recipe(name: str) -> tuple[CaptionerConfig, TrainConfig]:
    """The book's settings: "shapes" (offline, CPU, minutes) or "flickr8k" (Colab GPU).

    `$CAPTION_LIB_RECIPE_OVERRIDES` (e.g. "epochs=12,batch_size=8") changes fields of
    either config, in every chapter alike; `make colab-check` uses it to train the
    flickr8k recipe on its tiny mirror in minutes. It says so on stderr when used.
    """
    model_config, config = _recipe(name)
    return _overridden(model_config, config, os.environ.get(RECIPE_ENV, ""))


def _overridden(model_config: CaptionerConfig, config: TrainConfig, spec: str
                ) -> tuple[CaptionerConfig, TrainConfig]:
    """Apply "field=value,..." (values parsed as JSON, else kept as strings)."""
    changed = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, text = item.partition("=")
        target = next((c for c in (config, model_config) if key.strip() in
                       {f.name for f in fields(c)}), None)
        if target is None or not text:
            raise CaptionLibError(f"{RECIPE_ENV}: {item!r} is not field=value of "
                                  "TrainConfig or CaptionerConfig")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        setattr(target, key.strip(), value)
        changed.append(f"{key.strip()}={value!r}")
    if changed:
        print(f"caption_lib: recipe changed by {RECIPE_ENV}: {', '.join(changed)}",
              file=sys.stderr)
    return model_config, config


def _recipe(name: str) -> tuple[CaptionerConfig, TrainConfig]:
    # alpha_c (both recipes): the paper's regulariser sums over regions; with 49 regions
    # and ~10 words lambda = 1 made it 10x the cross-entropy on shapes and pushed attention
    # towards uniform, so the book uses 1/49 (the popular tutorial's lambda = 1 with a mean
    # over regions instead of a sum)
    if name == "shapes":
        return (CaptionerConfig(encoder_weights="DEFAULT", fine_tune="auto", embed_dim=256,
                                decoder_dim=256, attention_dim=256, dropout=0.3,
                                alpha_c=0.02),
                TrainConfig(epochs=8, batch_size=32, lr=4e-4, encoder_lr=2e-4, min_freq=1,
                            captions_per_image=1, val_images=150, bn_images=256))
    if name == "flickr8k":
        return (CaptionerConfig(encoder_weights="DEFAULT", fine_tune="auto", alpha_c=0.02),
                TrainConfig(epochs=20, batch_size=64, min_freq=5, captions_per_image=0,
                            val_images=0))
    if name == "coco":  # Karpathy's COCO split; restval folded into train (113,287 images)
        model_config, config = _recipe("flickr8k")
        config.val_images, config.restval = 5000, "train"
        return model_config, config
    raise CaptionLibError(f"unknown recipe {name!r} (use shapes, flickr8k or coco)")


def _cmd_train(args) -> int:
    data = Path(args.data)
    if not data.exists():
        raise CaptionLibError(f"{data}: no such data folder (make one with `caption-lib make-shapes`)")
    name = args.recipe
    if name == "auto":
        name = ("shapes" if any(data.glob("dataset_shapes.json"))
                else "coco" if any(data.glob("dataset_coco.json")) else "flickr8k")
    model_config, config = recipe(name)
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "seed": args.seed, "restval": args.restval}
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    out = Path(args.out) if args.out else workspace_dir() / "runs" / data.name
    result = train(data, out, model_config, config, device=args.device, resume=args.resume,
                   progress=not args.no_progress)
    best = max(result.history, key=lambda h: h["val_bleu4"]) if result.history else None
    if best and distributed.is_main():  # data-parallel: rank 0 speaks
        print(f"best val BLEU-4 {best['val_bleu4']:.1f} at epoch {best['epoch']}; "
              f"checkpoints in {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a captioner (checkpoints: RUN_DIR/last.pt, best.pt); "
                       "runs data-parallel under torchrun --nproc_per_node=N")
    p.add_argument("--data", required=True, help="folder from make-shapes or a real data set")
    p.add_argument("--out", help="run folder (default: WORKSPACE/runs/DATA_NAME)")
    p.add_argument("--recipe", default="auto", choices=["auto", "shapes", "flickr8k", "coco"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="decoder learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--restval", choices=["train", "drop"],
                   help="COCO Karpathy split: fold the restval images into train (default) or drop them")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)
